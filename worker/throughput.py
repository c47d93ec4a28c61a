"""What one replica serves, measured online: image-steps per second by batch size.

An image-step is one image through one denoising step, the unit in which demand
(`contract.names.REQUESTED_IMAGE_STEPS`) and capacity (`contract.names.CAPACITY_IMAGE_STEPS`)
are both counted, so that a request of 4 images at 50 steps weighs ten times one of 1 image at
20. The engine records every pipeline call that produced images; the collector reads the
profile (`contract.names.BATCH_THROUGHPUT`) and the capacity at the max batch in force.
"""

from __future__ import annotations

import threading

EWMA_WEIGHT = 0.2  # the newest batch's weight: a sample's weight halves about every 3 batches


class ThroughputProfile:
    """Image-steps per second by batch size, each an exponentially weighted moving mean.

    A batch of b images at s steps whose pipeline call took t seconds (the span the busy-seconds
    counter adds for it) is one sample x = b * s / t of batch size b. The mean at b starts at
    b's first sample and moves by m_b <- (1 - w) * m_b + w * x with w = `weight` (the EWMA of
    Roberts 1959, weighted per batch, not per second: a replica that idles keeps what it
    measured). Batch sizes seen are at most the configured max batch, so the profile is small.
    `record` runs on the pipeline thread, the readers at scrape time; a lock keeps them apart.
    """

    def __init__(self, weight: float = EWMA_WEIGHT) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self._weight = weight
        self._means: dict[int, float] = {}
        self._lock = threading.Lock()

    def record(self, batch_size: int, image_steps: int, seconds: float) -> None:
        """One pipeline call: `batch_size` images, `image_steps` images x steps, in `seconds`.

        Raises ValueError for a batch under 1 image, image-steps under 1 or negative seconds; a
        call timed at 0 s (a clock too coarse to time it) says nothing of a rate and is skipped.
        """
        if batch_size < 1 or image_steps < 1:
            raise ValueError(f"a batch needs at least 1 image and 1 image-step, got {batch_size} and {image_steps}")
        if seconds < 0:
            raise ValueError(f"a batch cannot take {seconds} s")
        if seconds == 0:
            return
        sample = image_steps / seconds
        with self._lock:
            mean = self._means.get(batch_size)
            self._means[batch_size] = sample if mean is None else (1 - self._weight) * mean + self._weight * sample

    def by_batch_size(self) -> dict[int, float]:
        """Image-steps per second by batch size, for the sizes measured so far."""
        with self._lock:
            return dict(self._means)

    def capacity(self, max_batch_size: int) -> float | None:
        """Image-steps per second at `max_batch_size` images per batch, once a batch of that size
        ran; until then the best measured at a smaller size (throughput grows with batch size, so
        that underestimates: the safe side for a scaler); None before any batch of at most
        `max_batch_size` images ran. Sizes above it (measured before the max batch was lowered)
        are not what this replica serves now and are left out."""
        with self._lock:
            if max_batch_size in self._means:
                return self._means[max_batch_size]
            within = [mean for size, mean in self._means.items() if size <= max_batch_size]
        return max(within) if within else None
