"""Table tests of RecommendationWindow: HPA semantics, a sample counts when t > now - window."""

import pytest

from adapter.windows import RecommendationWindow


def window_of(*samples):
    return RecommendationWindow(tuple(samples))


@pytest.mark.parametrize(
    "samples, now, window_s, current, lowest, highest",
    [
        # empty history: the current recommendation alone
        ((), 100, 60, 5, 5, 5),
        # a zero window ignores all history, as the HPA's default scale-up window does
        (((99, 1), (100, 9)), 100, 0, 5, 5, 5),
        # everything inside the window counts, the current value too
        (((50, 7), (70, 2), (90, 4)), 100, 60, 3, 2, 7),
        # a sample exactly at now - window is outside (strictly after the cutoff)
        (((40, 1), (41, 8)), 100, 60, 3, 3, 8),
        # older samples are ignored entirely
        (((10, 0), (20, 20)), 100, 60, 3, 3, 3),
    ],
)
def test_window_bounds(samples, now, window_s, current, lowest, highest):
    window = window_of(*samples)
    assert window.lowest(now, window_s, current) == lowest
    assert window.highest(now, window_s, current) == highest


def test_record_keeps_only_what_the_longest_window_needs():
    window = RecommendationWindow()
    for t in range(0, 100, 10):
        window = window.record(t, t, keep_seconds=30)
    assert [t for t, _ in window.samples] == [70, 80, 90]


def test_record_returns_a_new_window_and_leaves_the_old_one_alone():
    before = window_of((1, 1))
    after = before.record(2, 2, keep_seconds=10)
    assert len(before) == 1 and len(after) == 2
