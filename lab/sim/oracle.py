"""The yardsticks every policy is measured against: a clairvoyant oracle, and the work bound below it.

The work bound is a proven lower bound on the GPU-hours of serving every request: each request's
images x steps at the best rate the fleet can compute them (the batch size with the most
image-steps per second), summed, with no start-up, no idle time and no waiting. No policy that
answers every request spends less; one that rejects requests may.

The oracle (`OracleController`) is a policy that knows the future: every arrival, and each
replica's start-up delay before asking for it. The fleet draws the k-th replica it starts a
delay from `random.Random(seed)`, in the order replicas are started (`Fleet.scale_to`); the
oracle draws the same sequence from its own `random.Random(seed)`, so it knows what the next
replica it asks for will take, and nothing else of the fleet's internals. It scales the same
`Fleet` through the same `FleetTarget` as every policy, every scrape (1 s), with no KEDA or HPA
between: no polling, no sync period, no stabilization.

How it decides: it cuts time into bins (half the objective by default) and, per bin, asks for
the replicas the bin's work needs, ceil(image-steps arriving / (bin x image-steps per second at
max batch x `target_utilization`)), between min and max replicas. Work arriving in a bin may
wait about a bin for capacity, which leaves the other half of the objective for the batch's own
service time. It starts the next replica as soon as, ready after its known delay, it would meet
a shortfall (the replicas ready by then fewer than that bin asks for), so a replica is ready
when its bin begins. It releases the newest replica (the one the fleet drains) when no bin,
from when that replica is ready until a replacement asked for now could be ready plus one bin,
asks for more than the others have ready: a gap shorter than a start-up is cheaper to hold than
to pay for again. Of the fleet it reads only the queue, for two rules at zero replicas that no
plan avoids: requests waiting with no replica (the first ones of a run that opens at zero, before
any start-up can end) start one, and the last replica stays while requests wait on the queue.

`target_utilization` trades GPU-hours for queueing. Above 1 is allowed, as an HPA's
utilization target may exceed 100 %: bins round up and the release rule holds a replica across
short dips, so the fleet keeps more headroom than the target says. `replay.run_job` replays the
oracle at each of `ORACLE_UTILIZATIONS` and keeps the cheapest run whose SLO attainment is
within 0.1 point of the best the oracle reaches (`cheapest_best`). This is a clairvoyant
heuristic: its GPU-hours are an upper estimate of the true optimum (which would search every
schedule), while the work bound is a proven lower bound; the truth lies between them.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence

from lab.target import FleetTarget
from lab.sim.controller import Controller
from lab.sim.fleet import FleetSpec
from lab.sim.observe import Observation
from lab.sim.report import PolicyResult
from lab.sim.traces import Arrival

ORACLE = "oracle"
ORACLE_MIN0 = "oracle-min0"  # the oracle down to zero, on a queue
# The target utilizations the oracle is replayed at; the cheapest run at the best SLO is kept.
ORACLE_UTILIZATIONS = (0.8, 0.9, 1.0, 1.1, 1.2)
SLO_TOLERANCE = 0.001  # 0.1 point of SLO attainment: what the tables show


def best_batch(spec: FleetSpec, largest_request_images: int = 1) -> tuple[int, float]:
    """The batch size with the most image-steps per second that the fleet can run, and that rate.

    The fleet runs batches of 1 to `spec.max_batch` images, and a request of more images than the
    max batch alone at its own size (`largest_request_images`); a batch of n images at s steps
    takes `spec.profile.seconds(n, s)`, linear in s, so the rate n x s / seconds does not depend
    on s. Raises ValueError for a largest request below one image."""
    if largest_request_images < 1:
        raise ValueError(f"a request has at least one image, got {largest_request_images}")
    profile = spec.profile
    # beyond the profile's largest batch the throughput holds, so larger sizes add nothing
    largest = max(spec.max_batch, min(largest_request_images, profile.table[-1][0]))
    rates = ((n * profile.reference_steps / profile.seconds(n, profile.reference_steps), n)
             for n in range(1, largest + 1))
    rate, batch = max(rates)
    return batch, rate


def work_bound_gpu_hours(arrivals: Sequence[Arrival], spec: FleetSpec) -> float:
    """The work bound: every request's images x steps at `best_batch`'s rate, summed, in GPU-hours.

    A proven lower bound on the GPU-hours of answering every request on this fleet: a GPU
    computes no faster than its best batch, and start-up, idle and drain time only add."""
    if not arrivals:
        return 0.0
    _, rate = best_batch(spec, max(a.images for a in arrivals))
    return sum(a.images * a.steps for a in arrivals) / rate / 3600


def max_batch_rate(spec: FleetSpec) -> float:
    """A replica's image-steps per second at the max batch (the profile's seconds for it)."""
    steps = spec.profile.reference_steps
    return spec.max_batch * steps / spec.profile.seconds(spec.max_batch, steps)


class OracleController(Controller):
    """A clairvoyant policy: knows every arrival and each replica's start-up delay in advance.

    `arrivals` are the replay's, `spec` and `seed` the fleet's (its start-up delays come from
    `random.Random(seed)`), replicas stay within `min_replicas`..`max_replicas`; bins are
    `bin_s` seconds (default half of `slo_s`), each asking for its work at `target_utilization`
    (0 < u <= 2) of a replica's max-batch rate (the module's docstring has the rule). It is
    stepped every `step_s` seconds (the replay's scrape), so it asks for a replica up to a step
    before the latest moment that gets it ready in time. It expects the fleet to open with
    `opening` replicas ready (default `min_replicas`; `run_job` opens every policy with at least one) and to be scaled by nothing else; it raises
    RuntimeError when the fleet differs from its plan, and ValueError naming a bad argument.
    One instance drives one replay."""

    def __init__(self, arrivals: Sequence[Arrival], spec: FleetSpec, seed: int, min_replicas: int, max_replicas: int,
                 slo_s: float, target_utilization: float, bin_s: float | None = None, step_s: float = 1.0,
                 name: str = ORACLE, opening: int | None = None) -> None:
        if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas and max_replicas >= 1, "
                             f"got {min_replicas} and {max_replicas}")
        if not slo_s > 0:
            raise ValueError(f"slo_s must be above 0, got {slo_s}")
        if not 0 < target_utilization <= 2:
            raise ValueError(f"target_utilization must be in (0, 2], got {target_utilization}")
        if bin_s is not None and not bin_s > 0:
            raise ValueError(f"bin_s must be above 0, got {bin_s}")
        if not step_s > 0:
            raise ValueError(f"step_s must be above 0, got {step_s}")
        if any(b.t_s < a.t_s for a, b in zip(arrivals, arrivals[1:])) or (arrivals and arrivals[0].t_s < 0):
            raise ValueError("arrivals must be sorted by time, from t >= 0")
        self.name = name
        self.spec = spec
        self.min_replicas, self.max_replicas = min_replicas, max_replicas
        self.bin_s = slo_s / 2 if bin_s is None else bin_s
        self.target_utilization = target_utilization
        self.step_s = step_s
        self.need = self._need_per_bin(arrivals)
        self._peak_from = list(itertools.accumulate(reversed(self.need), max))[::-1]  # the most any bin from b on asks
        self._rng = random.Random(seed)  # the fleet's own sequence of start-up delays
        self._delays: list[float] = []  # drawn so far, the k-th for the k-th replica started
        self._started = 0  # replicas started after the opening ones: the next one takes _delays[_started]
        opening = min_replicas if opening is None else opening
        if not min_replicas <= opening <= max_replicas:
            raise ValueError(f"opening must be within min and max replicas, got {opening}")
        self._ready_s = [0.0] * opening  # each serving replica's ready time, oldest first

    def _need_per_bin(self, arrivals: Sequence[Arrival]) -> list[int]:
        """Replicas each bin asks for: its image-steps over what a replica computes in a bin at
        the target utilization, rounded up, within min and max replicas."""
        per_bin = self.bin_s * max_batch_rate(self.spec) * self.target_utilization
        work = [0.0] * (int(arrivals[-1].t_s // self.bin_s) + 1 if arrivals else 0)
        for arrival in arrivals:
            work[int(arrival.t_s // self.bin_s)] += arrival.images * arrival.steps
        # 1e-9: a bin whose work is exactly n replicas' needs n, not n + 1 through rounding
        return [min(self.max_replicas, max(self.min_replicas, math.ceil(w / per_bin - 1e-9))) for w in work]

    def need_at(self, t: float) -> int:
        """Replicas the plan wants ready at `t` seconds (min replicas after the last arrival's bin)."""
        index = int(t // self.bin_s)
        return self.need[index] if 0 <= index < len(self.need) else self.min_replicas

    def next_delay_s(self, after: int = 0) -> float:
        """The start-up delay of the next replica this oracle will ask for (of the one `after`
        more after it), as the fleet will draw it."""
        while len(self._delays) <= self._started + after:
            self._delays.append(self.spec.startup.draw(self._rng))
        return self._delays[self._started + after]

    def planned_ready_s(self) -> list[float]:
        """When each serving replica is (or was) ready, oldest first: the fleet's, by construction."""
        return list(self._ready_s)

    def step(self, observation: Observation, target: FleetTarget) -> None:
        if target.desired != len(self._ready_s):
            raise RuntimeError(f"{self.name}: the fleet serves {target.desired} replicas where the plan has "
                               f"{len(self._ready_s)}; the oracle must open as its plan says and be the only "
                               "controller of its fleet")
        now, opening = observation.t, len(self._ready_s)
        # up: the fleet starts replicas in order, each with its known delay
        for _ in range(self._due(now)):
            self._start(now + self.next_delay_s())
        # work that waits with nothing to serve it (a request before any start-up could end): the
        # plan cannot be met for it, but it is answered as soon as possible
        if not self._ready_s and observation.signals.queue > 0:
            self._start(now + self.next_delay_s())
        # down: the newest replica (the one the fleet drains) goes when nothing needs it until a
        # replacement could be ready again
        while len(self._ready_s) > self.min_replicas and not self._newest_needed(now):
            if len(self._ready_s) == 1 and observation.signals.queue > 0:
                break  # the last replica stays while requests wait (on a queue, nothing else would pull them)
            if len(self._ready_s) > opening:  # started in this step: the fleet never draws its delay
                self._started -= 1
            self._ready_s.pop()
        target.scale_to(len(self._ready_s))

    def _start(self, ready_s: float) -> None:
        self._ready_s.append(ready_s)
        self._started += 1

    def _due(self, now: float) -> int:
        """How many of the next replicas must be asked for now: the j-th is due when, asked for now
        with the j - 1 before it, it would be ready to meet a shortfall that a step later it would
        miss; the fleet starts replicas in order, so all before a due one are due too (a short
        delay behind a long one has to wait for it)."""
        index = int(now // self.bin_s)
        peak = self._peak_from[index] if index < len(self._peak_from) else self.min_replicas
        planned, due = list(self._ready_s), 0
        # the j-th next replica can only meet a shortfall while fewer than the peak ahead are planned
        for j in range(min(self.max_replicas, peak) - len(self._ready_s)):
            ready = now + self.next_delay_s(j)
            if self._short(planned, ready, ready + self.step_s):
                due = j + 1
            planned.append(ready)
        return due

    def _newest_needed(self, now: float) -> bool:
        """Whether, from when the newest replica is ready until a replacement asked for now could
        be ready plus one bin, the others alone fall short of the plan."""
        newest = self._ready_s[-1]
        return self._short(self._ready_s[:-1], max(now, newest), max(now + self.next_delay_s(), newest) + self.bin_s)

    def _short(self, ready_s: Sequence[float], start_s: float, end_s: float) -> bool:
        """Whether at some instant from `start_s` to before `end_s` a bin asks for more replicas
        than those of `ready_s` (their ready times) are ready."""
        t = start_s
        while t < end_s:
            # replicas only become ready as time passes: a bin's first instant in the span is its worst
            if self.need_at(t) > sum(1 for ready in ready_s if ready <= t):
                return True
            t = (t // self.bin_s + 1) * self.bin_s
        return False


def cheapest_best(runs: Sequence[PolicyResult], tolerance: float = SLO_TOLERANCE) -> PolicyResult:
    """Of one policy's runs (the oracle at several utilizations), the one with the fewest GPU-hours
    among those whose SLO attainment is within `tolerance` (a fraction: 0.001 is 0.1 point) of
    the best; ties go to the higher attainment. Raises ValueError for no runs."""
    if not runs:
        raise ValueError("no runs to choose from")
    best = max(r.slo_attainment for r in runs)
    return min((r for r in runs if r.slo_attainment >= best - tolerance),
               key=lambda r: (r.gpu_hours, -r.slo_attainment))
