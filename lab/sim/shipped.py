"""What the manifests ship, as the simulator's defaults: the ScaledObject's trigger metadata and
bounds, the worker Deployment's batching, and what the queue overlay changes to go to zero.
`tests/lab/test_simulate.py` keeps them equal to the base, `tests/lab/test_scale_to_zero.py` to the overlay."""

from __future__ import annotations

# The trigger metadata our ScaledObject ships (manifests/base/scaledobject.yaml, less its
# addresses and selector); a test keeps the two equal. The simulator's composite starts here.
SHIPPED_METADATA: dict[str, str] = {
    "targetQueuePerReplica": "16",
    "targetGpuUtilization": "90",
    "targetP95Seconds": "6",
    "scaleDownWindowSeconds": "180",
    "minBusyReplicas": "2",
}
# The worker Deployment's batching (manifests/base/worker.yaml) and the ScaledObject's bounds.
SHIPPED_MAX_BATCH = 12
SHIPPED_MAX_WAIT_S = 0.05
SHIPPED_MAX_QUEUE = 96
SHIPPED_MIN_REPLICAS = 1
SHIPPED_MAX_REPLICAS = 16
SHIPPED_POLLING_INTERVAL_S = 15.0

# The queue overlay (manifests/overlays/queue/scaledobject-queue.yaml): the composite at zero,
# its metadata over the base's. Polling every 5 s, as a poll at zero only decides activation and
# cooldown; a 60 s cooldown after the scaler's keep-warm hold (chosen from the idle gaps seen),
# chosen by bench/choose_defaults.py over every scenario (docs/EVALUATION.md).
SHIPPED_QUEUE_METADATA: dict[str, str] = {"activationQueue": "0", "minReplicas": "0"}
SHIPPED_QUEUE_MIN_REPLICAS = 0
SHIPPED_QUEUE_POLLING_INTERVAL_S = 5.0
SHIPPED_QUEUE_COOLDOWN_PERIOD_S = 60.0
