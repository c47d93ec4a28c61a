"""The batch queue as timelines: what is handed out when, with the clock passed in."""

from __future__ import annotations

import threading

import pytest

from worker.batching import Batch, BatchKey, BatchPolicy, BatchQueue, Job, QueueClosed, QueueFull, Slice

SMALL = BatchKey(64, 64, steps=20, guidance_scale=7.5)
LARGE = BatchKey(128, 128, steps=20, guidance_scale=7.5)
FEW_STEPS = BatchKey(64, 64, steps=4, guidance_scale=7.5)


def job(at: float, key: BatchKey = SMALL, n: int = 1, prompt: str = "p") -> Job:
    return Job(key=key, prompt=prompt, negative_prompt=None, seeds=tuple(range(n)), arrived_at=at)


def sizes(batch: Batch) -> list[tuple[str, int, int]]:
    return [(piece.job.prompt, piece.start, piece.stop) for piece in batch.slices]


def test_a_lone_request_waits_max_wait_then_runs_alone():
    policy = BatchPolicy(max_batch_size=8, max_wait_s=0.05)
    queue = BatchQueue(capacity_images=16)
    queue.submit(job(at=10.0))
    assert queue.poll(policy, now=10.01) == pytest.approx(0.04)
    batch = queue.poll(policy, now=10.05)
    assert isinstance(batch, Batch) and batch.size == 1
    assert queue.poll(policy, now=10.05) is None


def test_a_full_batch_goes_at_once_without_waiting():
    policy = BatchPolicy(max_batch_size=4, max_wait_s=10.0)
    queue = BatchQueue(capacity_images=16)
    for index in range(4):
        queue.submit(job(at=1.0 + index * 0.001, prompt=f"r{index}"))
    batch = queue.poll(policy, now=1.004)
    assert isinstance(batch, Batch)
    assert [p for p, _, _ in sizes(batch)] == ["r0", "r1", "r2", "r3"]


def test_a_request_with_n_images_counts_n_and_spans_batches():
    policy = BatchPolicy(max_batch_size=4, max_wait_s=0.0)
    queue = BatchQueue(capacity_images=16)
    queue.submit(job(at=0.0, n=5, prompt="five"))
    queue.submit(job(at=0.1, n=2, prompt="two"))
    first = queue.poll(policy, now=1.0)
    second = queue.poll(policy, now=1.0)
    assert sizes(first) == [("five", 0, 4)]
    assert sizes(second) == [("five", 4, 5), ("two", 0, 2)]
    assert second.seeds() == [4, 0, 1]
    assert queue.waiting_images == 0


def test_incompatible_requests_never_share_a_batch_and_the_oldest_goes_first():
    policy = BatchPolicy(max_batch_size=8, max_wait_s=0.0)
    queue = BatchQueue(capacity_images=16)
    queue.submit(job(at=0.0, key=SMALL, prompt="s1"))
    queue.submit(job(at=0.1, key=LARGE, prompt="l1"))
    queue.submit(job(at=0.2, key=SMALL, prompt="s2"))
    queue.submit(job(at=0.3, key=FEW_STEPS, prompt="f1"))
    queue.submit(job(at=0.4, key=LARGE, prompt="l2"))
    batches = []
    while isinstance(batch := queue.poll(policy, now=1.0), Batch):
        batches.append((batch.key, [p for p, _, _ in sizes(batch)]))
    assert batches == [(SMALL, ["s1", "s2"]), (LARGE, ["l1", "l2"]), (FEW_STEPS, ["f1"])]


def test_a_steady_stream_of_one_kind_does_not_starve_another():
    policy = BatchPolicy(max_batch_size=2, max_wait_s=0.0)
    queue = BatchQueue(capacity_images=64)
    queue.submit(job(at=0.0, key=LARGE, prompt="large"))
    for index in range(10):
        queue.submit(job(at=0.01 * (index + 1), key=SMALL, prompt=f"s{index}"))
    first = queue.poll(policy, now=1.0)
    assert first.key == LARGE  # it has waited longest, however many small ones pile up


def test_the_wait_is_measured_from_the_oldest_request_of_the_batch():
    policy = BatchPolicy(max_batch_size=8, max_wait_s=0.5)
    queue = BatchQueue(capacity_images=16)
    queue.submit(job(at=0.0, prompt="first"))
    queue.submit(job(at=0.4, prompt="second"))
    assert queue.poll(policy, now=0.45) == pytest.approx(0.05)
    batch = queue.poll(policy, now=0.5)
    assert [p for p, _, _ in sizes(batch)] == ["first", "second"]


def test_the_queue_refuses_beyond_its_capacity_in_images_and_keeps_nothing_of_the_refused():
    queue = BatchQueue(capacity_images=4)
    queue.submit(job(at=0.0, n=3))
    with pytest.raises(QueueFull) as refused:
        queue.submit(job(at=0.1, n=2))
    assert refused.value.waiting_images == 3
    assert queue.waiting_images == 3 and queue.waiting_jobs == 1
    queue.submit(job(at=0.2, n=1))
    assert queue.waiting_images == 4


def test_handed_out_images_free_their_room_in_the_queue():
    policy = BatchPolicy(max_batch_size=2, max_wait_s=0.0)
    queue = BatchQueue(capacity_images=4)
    queue.submit(job(at=0.0, n=4))
    queue.poll(policy, now=1.0)
    queue.submit(job(at=1.0, n=2))
    assert queue.waiting_images == 4


def test_cancel_drops_only_what_has_not_started():
    policy = BatchPolicy(max_batch_size=4, max_wait_s=0.0)
    queue = BatchQueue(capacity_images=16)
    spanning = job(at=0.0, n=6, prompt="spanning")
    queue.submit(spanning)
    queue.poll(policy, now=1.0)
    assert queue.cancel(spanning) == 2
    assert queue.waiting_images == 0 and queue.poll(policy, now=1.0) is None
    assert queue.cancel(spanning) == 0


def test_started_at_is_when_the_first_image_was_handed_out():
    policy = BatchPolicy(max_batch_size=2, max_wait_s=0.0)
    queue = BatchQueue(capacity_images=16)
    spanning = job(at=0.0, n=3)
    queue.submit(spanning)
    queue.poll(policy, now=1.0)
    queue.poll(policy, now=2.0)
    assert spanning.started_at == 1.0


def test_a_closed_queue_refuses_new_jobs_and_flushes_what_waits_without_waiting_to_fill():
    policy = BatchPolicy(max_batch_size=8, max_wait_s=60.0)
    queue = BatchQueue(capacity_images=16)
    queue.submit(job(at=0.0))
    queue.close()
    with pytest.raises(QueueClosed):
        queue.submit(job(at=0.1))
    assert isinstance(queue.poll(policy, now=0.1), Batch)
    assert queue.take(policy) is None


def test_take_blocks_until_a_batch_is_due_and_wakes_on_submit():
    policy = BatchPolicy(max_batch_size=8, max_wait_s=0.0)
    queue = BatchQueue(capacity_images=16)
    taken: list[Batch | None] = []
    taker = threading.Thread(target=lambda: taken.append(queue.take(policy)))
    taker.start()
    taker.join(0.2)
    assert taker.is_alive()
    queue.submit(job(at=0.0))
    taker.join(5)
    assert not taker.is_alive() and taken[0].size == 1


@pytest.mark.parametrize("layout", [[1], [3], [1, 1], [2, 3], [1, 2, 1, 4], [5, 1, 1]])
def test_split_keeps_every_image_once_in_order_and_halves_the_size(layout):
    jobs = [job(at=0.0, n=n, prompt=f"j{index}") for index, n in enumerate(layout)]
    policy = BatchPolicy(max_batch_size=64, max_wait_s=0.0)
    queue = BatchQueue(capacity_images=64)
    for each in jobs:
        queue.submit(each)
    batch = queue.poll(policy, now=1.0)
    if batch.size < 2:
        return
    first, second = batch.split()
    assert first.size == batch.size // 2 and second.size == batch.size - batch.size // 2
    assert first.prompts() + second.prompts() == batch.prompts()
    assert first.seeds() + second.seeds() == batch.seeds()


def test_unfinished_drops_the_slices_of_answered_jobs_and_keeps_the_rest_in_order():
    answered, waiting = job(at=0.0, n=2, prompt="answered"), job(at=0.0, n=3, prompt="waiting")
    batch = Batch(SMALL, (Slice(waiting, 0, 1), Slice(answered, 0, 2), Slice(waiting, 1, 3)))
    answered.finished = True
    assert sizes(batch.unfinished()) == [("waiting", 0, 1), ("waiting", 1, 3)]
    waiting.finished = True
    assert batch.unfinished().size == 0


def test_bad_settings_are_refused_naming_the_flag_and_the_value():
    with pytest.raises(ValueError, match="capacity_images must be at least 1, got 0"):
        BatchQueue(capacity_images=0)
    with pytest.raises(ValueError, match=r"max_wait_s must be at least 0 \(flag --max-wait-ms\), got -1"):
        BatchPolicy(max_batch_size=1, max_wait_s=-1)
    with pytest.raises(ValueError, match=r"max_batch_size must be at least 1 \(flag --max-batch-size\), got 0"):
        BatchPolicy(max_batch_size=0, max_wait_s=0.0)
    with pytest.raises(ValueError, match="at least one image"):
        Job(key=SMALL, prompt="p", negative_prompt=None, seeds=(), arrived_at=0.0)
