"""Stabilization windows over timestamped replica recommendations, with the HPA's semantics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RecommendationWindow:
    """Recommendations (time, replicas), oldest first, kept as long as the longest window needs.

    Immutable: `record` returns a new window, so a decision can be computed without touching
    the state it started from. A sample belongs to a window of `w` seconds ending at `now`
    when its time is strictly after `now - w`, as in the HPA's
    `stabilizeRecommendationWithBehaviors`; a window of 0 holds no history at all.
    """

    samples: tuple[tuple[float, float], ...] = ()

    def record(self, now: float, replicas: float, keep_seconds: float) -> RecommendationWindow:
        """Adds a recommendation made at `now` and drops those older than `keep_seconds`."""
        cutoff = now - keep_seconds
        kept = tuple(s for s in self.samples if s[0] > cutoff)
        return RecommendationWindow(kept + ((now, replicas),))

    def lowest(self, now: float, window_seconds: float, current: float) -> float:
        """The smallest of `current` and the recommendations inside the window."""
        cutoff = now - window_seconds
        return min([current, *(r for t, r in self.samples if t > cutoff)])

    def highest(self, now: float, window_seconds: float, current: float) -> float:
        """The largest of `current` and the recommendations inside the window."""
        cutoff = now - window_seconds
        return max([current, *(r for t, r in self.samples if t > cutoff)])

    def __len__(self) -> int:
        return len(self.samples)
