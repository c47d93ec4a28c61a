"""Every metric and label name the worker and the exporter expose and the scaler, the rules and
the dashboards read; the signal names; the histogram buckets.

One name, one place: the worker and the exporter register their families under these names,
the scaler's built-in PromQL and its direct scrapes read them, `tools/genmonitoring.py` builds
the dashboard from them, and a test checks every name in the rules and dashboards is one of
them. Names follow Prometheus' conventions (base units, `_total` on counters, which
prometheus_client adds); the GPU names are dcgm-exporter's, so existing GPU dashboards work.
"""

from __future__ import annotations

# -- the worker (worker/metrics.py): its load signals --------------------------------------------

QUEUE_DEPTH = "diffusion_queue_depth"  # gauge, images waiting for the pipeline
REQUESTS_IN_FLIGHT = "diffusion_requests_in_flight"  # gauge, requests accepted and not yet answered
REQUEST_DURATION = "diffusion_request_duration_seconds"  # histogram, arrival to response
QUEUE_WAIT = "diffusion_queue_wait_seconds"  # histogram, arrival to the first image's start
BATCH_SIZE = "diffusion_batch_size"  # histogram, images per pipeline call
BUSY_SECONDS = "diffusion_busy_seconds"  # counter (exposed with _total), seconds computing
REQUESTS = "diffusion_requests"  # counter (exposed with _total), by OUTCOME_LABEL
IMAGES = "diffusion_images"  # counter (exposed with _total), images generated
MAX_BATCH_SIZE = "diffusion_max_batch_size"  # gauge, the batch limit in force now
READY = "diffusion_ready"  # gauge, 1 when the model is loaded and the worker is not draining
MODEL_LOAD = "diffusion_model_load_seconds"  # gauge, seconds the model took to load (imports included)
WARM_UP_SECONDS = "diffusion_warmup_seconds"  # gauge, model loaded to ready: warm-up, compile and capture, probe
COMPILED_BUCKETS = "diffusion_compiled_buckets"  # gauge, batch sizes compiled and captured (0: the pipeline runs eagerly)
EAGER_BATCHES = "diffusion_eager_batches"  # counter (exposed with _total), batches a compiled worker ran eagerly
ENCODER_RESTARTS = "diffusion_png_encoder_restarts"  # counter (exposed with _total), encoder process pools replaced
BATCH_SPLITS = "diffusion_batch_splits"  # counter (exposed with _total), failed batches bisected for retry
ISOLATED_FAILURES = "diffusion_isolated_failures"  # counter (exposed with _total), failed alone after a split
# What a replica can serve and what is asked of it, in image-steps (images x denoising steps):
CAPACITY_IMAGE_STEPS = "diffusion_capacity_image_steps_per_second"  # gauge, served at the max batch size, measured
BATCH_THROUGHPUT = "diffusion_batch_throughput_image_steps_per_second"  # gauge by BATCH_SIZE_LABEL, measured
BATCH_SIZE_LABEL = "batch_size"  # BATCH_THROUGHPUT: images in the batch
STARTUP_SECONDS = "diffusion_startup_seconds"  # gauge, process start to ready (load, warm-up, capacity probe)
REQUESTED_IMAGE_STEPS = "diffusion_requested_image_steps"  # counter (exposed with _total), asked of this worker, on arrival
# Kept apart from REQUESTS, whose rate is the scaler's arrivals: refused clients must not scale the fleet.
HTTP_UNAUTHORIZED = "diffusion_http_unauthorized"  # counter (exposed with _total), requests refused 401 (--api-key-file)

# pull mode (worker/queue.py): jobs taken off the Redis stream
QUEUE_JOBS = "diffusion_queue_jobs"  # counter (exposed with _total), jobs ended by this worker, by JOB_OUTCOME_LABEL
QUEUE_RECLAIMED = "diffusion_queue_reclaimed"  # counter (exposed with _total), jobs taken over from a dead consumer
QUEUE_IN_HAND = "diffusion_queue_jobs_in_hand"  # gauge, jobs pulled off the stream and not yet acknowledged

WORKER_METRICS = (QUEUE_DEPTH, REQUESTS_IN_FLIGHT, REQUEST_DURATION, QUEUE_WAIT, BATCH_SIZE, BUSY_SECONDS,
                  REQUESTS, IMAGES, MAX_BATCH_SIZE, READY, MODEL_LOAD, WARM_UP_SECONDS, COMPILED_BUCKETS,
                  EAGER_BATCHES, ENCODER_RESTARTS, BATCH_SPLITS, ISOLATED_FAILURES,
                  CAPACITY_IMAGE_STEPS, BATCH_THROUGHPUT, STARTUP_SECONDS, REQUESTED_IMAGE_STEPS,
                  QUEUE_JOBS, QUEUE_RECLAIMED, QUEUE_IN_HAND, HTTP_UNAUTHORIZED)

JOB_OUTCOME_LABEL = "outcome"  # QUEUE_JOBS: done, failed, expired, cancelled, dead_lettered, duplicate, missing
JOB_OUTCOMES = ("done", "failed", "expired", "cancelled", "dead_lettered", "duplicate", "missing")

# -- the gateway (gateway/): the front door that holds requests on the queue ---------------------

GATEWAY_ACCEPTED = "gateway_jobs_accepted"  # counter (exposed with _total), jobs enqueued, by API_LABEL
GATEWAY_REJECTED = "gateway_requests_rejected"  # counter (exposed with _total), refused, by REJECT_REASON_LABEL
GATEWAY_QUEUE_WAIT = "gateway_queue_wait_seconds"  # histogram, enqueue to a worker's start, of jobs seen to end
GATEWAY_LATENCY = "gateway_request_duration_seconds"  # histogram, arrival to answer of the synchronous API
GATEWAY_BACKLOG = "gateway_backlog_jobs"  # gauge, the stream's backlog when last read
GATEWAY_REQUESTED_IMAGE_STEPS = "gateway_requested_image_steps"  # counter (exposed with _total), of jobs accepted, on enqueue
GATEWAY_METRICS = (GATEWAY_ACCEPTED, GATEWAY_REJECTED, GATEWAY_QUEUE_WAIT, GATEWAY_LATENCY, GATEWAY_BACKLOG,
                   GATEWAY_REQUESTED_IMAGE_STEPS)
API_LABEL = "api"  # GATEWAY_ACCEPTED: sync (/v1/images/generations) or async (/v1/jobs)
REJECT_REASON_LABEL = "reason"  # GATEWAY_REJECTED: invalid, backlog_full, redis_unavailable, unauthorized (401)
REJECT_REASONS = ("invalid", "backlog_full", "redis_unavailable", "unauthorized")

OUTCOME_LABEL = "outcome"
OUTCOMES = ("ok", "rejected", "timeout", "error", "cancelled")

# Request latencies of a diffusion worker run from a fraction of a second (tiny model, small
# batch) to minutes (deep queue); these bounds resolve the p95 the scaler reads across that
# span. Everything that builds or reads the latency histogram (the worker, the synthetic pods,
# the simulator's observer) uses them, so their quantiles interpolate alike.
LATENCY_BUCKETS_S = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

# -- the exporter (exporter/): dcgm-exporter's names and labels ----------------------------------

GPU_UTIL = "DCGM_FI_DEV_GPU_UTIL"  # the GPU signal the scaler reads
SM_CLOCK = "DCGM_FI_DEV_SM_CLOCK"
MEM_CLOCK = "DCGM_FI_DEV_MEM_CLOCK"
MEMORY_TEMP = "DCGM_FI_DEV_MEMORY_TEMP"
GPU_TEMP = "DCGM_FI_DEV_GPU_TEMP"
POWER_USAGE = "DCGM_FI_DEV_POWER_USAGE"
POWER_MGMT_LIMIT = "DCGM_FI_DEV_POWER_MGMT_LIMIT"
TOTAL_ENERGY_CONSUMPTION = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"
PCIE_REPLAY_COUNTER = "DCGM_FI_DEV_PCIE_REPLAY_COUNTER"
MEM_COPY_UTIL = "DCGM_FI_DEV_MEM_COPY_UTIL"
ENC_UTIL = "DCGM_FI_DEV_ENC_UTIL"
DEC_UTIL = "DCGM_FI_DEV_DEC_UTIL"
XID_ERRORS = "DCGM_FI_DEV_XID_ERRORS"
FB_FREE = "DCGM_FI_DEV_FB_FREE"
FB_USED = "DCGM_FI_DEV_FB_USED"
FB_RESERVED = "DCGM_FI_DEV_FB_RESERVED"
ECC_SBE_VOL_TOTAL = "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL"
ECC_DBE_VOL_TOTAL = "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL"
ECC_SBE_AGG_TOTAL = "DCGM_FI_DEV_ECC_SBE_AGG_TOTAL"
ECC_DBE_AGG_TOTAL = "DCGM_FI_DEV_ECC_DBE_AGG_TOTAL"
UNCORRECTABLE_REMAPPED_ROWS = "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"
CORRECTABLE_REMAPPED_ROWS = "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS"
ROW_REMAP_FAILURE = "DCGM_FI_DEV_ROW_REMAP_FAILURE"
CLOCKS_EVENT_REASONS = "DCGM_FI_DEV_CLOCKS_EVENT_REASONS"
PROF_SM_ACTIVE = "DCGM_FI_PROF_SM_ACTIVE"
PROF_PIPE_TENSOR_ACTIVE = "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"
PROF_DRAM_ACTIVE = "DCGM_FI_PROF_DRAM_ACTIVE"

# name -> (type, help), in dcgm-exporter's words where it has the field.
DCGM_METRICS: dict[str, tuple[str, str]] = {
    SM_CLOCK: ("gauge", "SM clock frequency (in MHz)."),
    MEM_CLOCK: ("gauge", "Memory clock frequency (in MHz)."),
    MEMORY_TEMP: ("gauge", "Memory temperature (in C)."),
    GPU_TEMP: ("gauge", "GPU temperature (in C)."),
    POWER_USAGE: ("gauge", "Power draw (in W)."),
    POWER_MGMT_LIMIT: ("gauge", "Enforced power limit (in W)."),
    TOTAL_ENERGY_CONSUMPTION: ("counter", "Total energy consumption since boot (in mJ)."),
    PCIE_REPLAY_COUNTER: ("counter", "Total number of PCIe retries."),
    GPU_UTIL: ("gauge", "GPU utilization (in %), mean of NVML's samples since the last collection."),
    MEM_COPY_UTIL: ("gauge", "Memory utilization (in %), mean of NVML's samples since the last collection."),
    ENC_UTIL: ("gauge", "Encoder utilization (in %)."),
    DEC_UTIL: ("gauge", "Decoder utilization (in %)."),
    XID_ERRORS: ("gauge", "Value of the last XID error encountered."),
    FB_FREE: ("gauge", "Framebuffer memory free (in MiB)."),
    FB_USED: ("gauge", "Framebuffer memory used (in MiB)."),
    FB_RESERVED: ("gauge", "Framebuffer memory reserved (in MiB)."),
    ECC_SBE_VOL_TOTAL: ("counter", "Total number of single-bit volatile ECC errors."),
    ECC_DBE_VOL_TOTAL: ("counter", "Total number of double-bit volatile ECC errors."),
    ECC_SBE_AGG_TOTAL: ("counter", "Total number of single-bit persistent ECC errors."),
    ECC_DBE_AGG_TOTAL: ("counter", "Total number of double-bit persistent ECC errors."),
    UNCORRECTABLE_REMAPPED_ROWS: ("counter", "Number of remapped rows for uncorrectable errors"),
    CORRECTABLE_REMAPPED_ROWS: ("counter", "Number of remapped rows for correctable errors"),
    ROW_REMAP_FAILURE: ("gauge", "Whether remapping of rows has failed"),
    CLOCKS_EVENT_REASONS: ("gauge", "Current clock event (throttle) reasons, NVML's bitmask."),
    PROF_SM_ACTIVE: ("gauge", "Ratio of SMs busy over the collection period (NVML GPM)."),
    PROF_PIPE_TENSOR_ACTIVE: ("gauge", "Ratio of time the tensor pipes were active (NVML GPM)."),
    PROF_DRAM_ACTIVE: ("gauge", "Ratio of DRAM bandwidth used to its peak (NVML GPM)."),
}

# dcgm-exporter's device labels, in its order, and the pod labels of the GPU's holder.
DEVICE_LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION")
POD_LABELS = ("container", "namespace", "pod")

# The exporter's own health (gpu_exporter_*).
EXPORTER_NVML_UP = "gpu_exporter_nvml_up"
EXPORTER_SNAPSHOT_STALE = "gpu_exporter_snapshot_stale"
EXPORTER_GPU_UP = "gpu_exporter_gpu_up"
EXPORTER_COLLECTION_DURATION = "gpu_exporter_collection_duration_seconds"
EXPORTER_LAST_COLLECTION = "gpu_exporter_last_collection_timestamp_seconds"
EXPORTER_COLLECTIONS = "gpu_exporter_collections"
EXPORTER_COLLECTION_TIMEOUTS = "gpu_exporter_collection_timeouts"
EXPORTER_COLLECTIONS_SKIPPED = "gpu_exporter_collections_skipped"
EXPORTER_NVML_ERRORS = "gpu_exporter_nvml_errors"
EXPORTER_PROCESS_MEMORY = "gpu_exporter_process_memory_used_bytes"
EXPORTER_PODRESOURCES_ERRORS = "gpu_exporter_podresources_errors"
EXPORTER_PODRESOURCES_REFRESHES = "gpu_exporter_podresources_refreshes"
EXPORTER_XID_EVENTS = "gpu_exporter_xid_events"  # counter (exposed with _total): XID events by gpu, UUID, xid
EXPORTER_XID_LABEL = "xid"  # EXPORTER_XID_EVENTS: the XID code
EXPORTER_GPU_HOLDERS = "gpu_exporter_gpu_holders"  # gauge by gpu, UUID: containers holding the GPU (DaemonSet)

EXPORTER_METRICS = (EXPORTER_NVML_UP, EXPORTER_SNAPSHOT_STALE, EXPORTER_GPU_UP, EXPORTER_COLLECTION_DURATION,
                    EXPORTER_LAST_COLLECTION, EXPORTER_COLLECTIONS, EXPORTER_COLLECTION_TIMEOUTS,
                    EXPORTER_COLLECTIONS_SKIPPED, EXPORTER_NVML_ERRORS, EXPORTER_PROCESS_MEMORY,
                    EXPORTER_PODRESOURCES_ERRORS, EXPORTER_PODRESOURCES_REFRESHES, EXPORTER_XID_EVENTS,
                    EXPORTER_GPU_HOLDERS)

# The self-metrics' labels besides the device labels' `gpu` and `UUID`.
EXPORTER_PID_LABEL = "pid"  # EXPORTER_PROCESS_MEMORY: the process
EXPORTER_CALL_LABEL = "call"  # EXPORTER_NVML_ERRORS: the NVML read that failed
EXPORTER_CODE_LABEL = "code"  # EXPORTER_PODRESOURCES_ERRORS: the gRPC status

# -- the scaler's signals -------------------------------------------------------------------------

QUEUE, GPU, LATENCY, READY_REPLICAS = "queue", "gpu", "latency", "ready"
CAPACITY = "capacity"  # the signal that divides demand by what one replica serves
DEMAND, ARRIVALS, STARTUP = "demand", "arrivals", "startup"  # its queries, with CAPACITY
SIGNALS = (QUEUE, GPU, LATENCY, CAPACITY)  # the signals that propose replicas, in tie-break order
CAPACITY_QUERIES = (DEMAND, ARRIVALS, CAPACITY, STARTUP)  # what the capacity signal reads
QUERIES = (QUEUE, READY_REPLICAS, GPU, LATENCY, *CAPACITY_QUERIES)  # what one refresh reads
SIGNAL_LABEL = "scaler_signal"  # tags each part of the joined PromQL query

# -- the scaler's own metrics (adapter/metrics.py), read by the dashboards and rules --------------

SCALER_LABELS = ("namespace", "scaledobject", "metric")  # on every per-ScaledObject series
SIGNAL = "signal"  # which signal: one of SIGNALS (and "none" on scaler_limiting_signal)
REASON = "reason"  # what holds the value away from the composite
QUERY = "query"  # which query: one of QUERIES, or "combined" for the joined request
RESULT = "result"  # a refresh's result: ok or error
METHOD, CODE = "method", "code"  # a gRPC call's method and status code
SCALER_SCALEDOBJECTS = "scaler_scaledobjects"
SCALER_QUEUE = "scaler_queue_requests"
SCALER_READY = "scaler_ready_replicas"
SCALER_GPU = "scaler_gpu_utilization_percent"
SCALER_P95 = "scaler_latency_p95_seconds"
SCALER_DEMAND = "scaler_demand_image_steps_per_second"
SCALER_CAPACITY = "scaler_capacity_image_steps_per_second"
SCALER_STARTUP = "scaler_startup_seconds"
SCALER_DEMAND_TREND = "scaler_demand_trend_image_steps_per_second_squared"
SCALER_PROPOSAL = "scaler_proposal_replicas"
SCALER_COMPOSITE = "scaler_composite_replicas"
SCALER_DESIRED = "scaler_desired_replicas"
SCALER_ACTIVE = "scaler_active"
SCALER_BURST = "scaler_burst"
SCALER_LIMITING = "scaler_limiting_signal"
SCALER_HOLD = "scaler_stabilization_hold"
SCALER_VALUE_AGE = "scaler_value_age_seconds"
SCALER_STALE = "scaler_stale"
SCALER_QUERY_LAST_DURATION = "scaler_query_last_duration_seconds"
SCALER_REFRESHES = "scaler_refreshes"
SCALER_QUERY_FAILURES = "scaler_query_failures"
SCALER_GRPC_REQUESTS = "scaler_grpc_requests"
SCALER_GRPC_DURATION = "scaler_grpc_request_duration_seconds"
SCALER_QUERY_DURATION = "scaler_prometheus_query_duration_seconds"
SCALER_KUBERNETES_API_FALLBACK = "scaler_kubernetes_api_fallback"
SCALER_SIGNAL_SILENT = "scaler_signal_silent"  # gauge by signal: enabled, no series, replicas ready
SCALER_KUBERNETES_EVENTS = "scaler_kubernetes_events"  # counter (exposed with _total), by REASON (the Event's) and RESULT

SCALER_METRICS = (SCALER_SCALEDOBJECTS, SCALER_QUEUE, SCALER_READY, SCALER_GPU, SCALER_P95,
                  SCALER_DEMAND, SCALER_CAPACITY, SCALER_STARTUP, SCALER_DEMAND_TREND, SCALER_PROPOSAL,
                  SCALER_COMPOSITE, SCALER_DESIRED, SCALER_ACTIVE, SCALER_BURST, SCALER_LIMITING, SCALER_HOLD,
                  SCALER_VALUE_AGE, SCALER_STALE, SCALER_QUERY_LAST_DURATION, SCALER_REFRESHES,
                  SCALER_QUERY_FAILURES, SCALER_GRPC_REQUESTS, SCALER_GRPC_DURATION, SCALER_QUERY_DURATION,
                  SCALER_KUBERNETES_API_FALLBACK, SCALER_SIGNAL_SILENT, SCALER_KUBERNETES_EVENTS)

ALL_METRICS = frozenset(WORKER_METRICS + tuple(DCGM_METRICS) + EXPORTER_METRICS + SCALER_METRICS + GATEWAY_METRICS)
