"""The next probe of an operating-point search: the cheapest setting of one method family that
passes the paired test of equal quality (report.tables.operating_points.paired_verdict).

A family has one knob (threshold, t_switch, steps) on a domain [low, high], cheaper towards one
end. Quality is assumed to worsen monotonically with cheapness, so the passing settings form an
interval at the expensive end, whose border is bisected: between the cheapest pass and the
cheapest failure above it, on a lattice of the knob's resolution. The expensive end itself is the
full model (τ 0, t_switch 0, all the sampling steps): a pass by definition, never sampled.

Everything here is on plain numbers (no files), so the tests drive it with hand-made scores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from duodiff.core.errors import require

# Why a search stopped (Result.reason).
CONVERGED = "converged"             # pass and failure at most one resolution step apart
BUDGET = "budget exhausted"         # the probe budget spent before converging
NONE_PASSES = "none passes"         # converged on the expensive end: nothing cheaper than the full model passes
CHEAPEST_END_PASSES = "cheapest end passes"  # the cheapest setting of the domain passes: nothing to bisect

TOLERANCE = 1e-9  # in resolution steps: a knob value within this of a lattice point is on it


@dataclass(frozen=True)
class Family:
    """One knob to search. `cheaper` is "higher" (threshold, t_switch) or "lower" (steps);
    `integer` knobs are probed at integers only; `resolution` is the lattice step of the probes."""

    knob: str
    low: float
    high: float
    cheaper: str
    resolution: float
    integer: bool = False

    def __post_init__(self):
        require(self.cheaper in ("higher", "lower"), f"cheaper must be higher or lower; got {self.cheaper!r}")
        require(self.low < self.high, f"{self.knob}: the domain [{self.low}, {self.high}] is empty")
        require(self.resolution > 0, f"{self.knob}: resolution must be positive; got {self.resolution}")
        require(not self.integer or float(self.resolution).is_integer(),
                f"{self.knob}: an integer knob needs an integer resolution; got {self.resolution}")

    def cheapness(self, value: float) -> float:
        """The knob value on an axis where larger is cheaper."""
        return value if self.cheaper == "higher" else -value

    @property
    def expensive_end(self) -> float:
        return self.low if self.cheaper == "higher" else self.high

    @property
    def cheapest_end(self) -> float:
        return self.high if self.cheaper == "higher" else self.low

    def value(self, step: int) -> float:
        """Lattice point `step` (in resolution steps from 0): clean decimals (0.17, not
        0.17000000000000001), ints for integer knobs."""
        value = step * self.resolution
        return round(value) if self.integer else round(value, 12)


@dataclass(frozen=True)
class Probe:
    """One observed setting: the knob value and whether it passed the paired test."""

    value: float
    passed: bool


@dataclass
class Result:
    """The search's state after the probes so far: the next knob value to probe, or done with the
    reason; the cheapest pass found (None: only the full model itself passes) and, when a failure
    is more expensive than a pass, a note saying the observations are not monotone."""

    next: float | None
    reason: str = ""
    best: float | None = None
    bracket: tuple = field(default_factory=tuple)  # (cheapest pass, cheapest failure above it or None)
    note: str = ""

    @property
    def done(self) -> bool:
        return self.next is None


def next_probe(family: Family, probes: list[Probe], budget: int, n_probed: int) -> Result:
    """The next setting to probe after `probes` (the grid's and the search's so far), or done.

    - The bracket is (cheapest pass, cheapest failure cheaper than it); the full model, at the
      expensive end, is a pass without a probe.
    - No failure cheaper than the cheapest pass: the cheapest end of the domain is probed (if it
      is not the cheapest pass already: then done, "cheapest end passes").
    - Otherwise the lattice point nearest the bracket's middle (the more expensive of two), strictly
      inside it; none left: done, "converged" (or "none passes" when the pass is the full model).
    - `n_probed` probes of the search spent (the grid's seeds are free) and budget reached: done,
      "budget exhausted", before any further probe.
    - A failure more expensive than the cheapest pass contradicts monotonicity: the note says so,
      and the cheapest pass is kept.
    """
    require(budget >= 0, f"the probe budget must be >= 0; got {budget}")
    for probe in probes:
        require(family.low <= probe.value <= family.high,
                f"{family.knob} {probe.value} is outside the domain [{family.low}, {family.high}]")
    values = [p.value for p in probes]
    require(len(set(values)) == len(values), f"{family.knob}: a setting was probed twice: {sorted(values)}")
    c = family.cheapness
    observed = [Probe(family.expensive_end, True)] + [p for p in probes if p.value != family.expensive_end]
    passes = [p.value for p in observed if p.passed]
    best = max(passes, key=c)
    best_found = None if best == family.expensive_end else best
    contradicting = sorted((p.value for p in observed if not p.passed and c(p.value) < c(best)), key=c)
    note = (f"not monotone: {family.knob} {', '.join(map(str, contradicting))} failed although the cheaper "
            f"{best} passed; the cheapest pass is kept") if contradicting else ""
    above = [p.value for p in observed if not p.passed and c(p.value) > c(best)]
    fail = min(above, key=c) if above else None

    def result(next_value=None, reason=""):
        return Result(next=next_value, reason=reason, best=best_found, bracket=(best, fail), note=note)

    if fail is None:
        if best == family.cheapest_end:
            return result(reason=CHEAPEST_END_PASSES)
        if n_probed >= budget:
            return result(reason=BUDGET)
        return result(family.cheapest_end)
    # Lattice steps (of the cheapness axis) strictly between the pass and the failure.
    lo, hi = c(best) / family.resolution, c(fail) / family.resolution
    first, last = math.floor(lo + TOLERANCE) + 1, math.ceil(hi - TOLERANCE) - 1
    if first > last:
        return result(reason=NONE_PASSES if best_found is None else CONVERGED)
    if n_probed >= budget:
        return result(reason=BUDGET)
    step = min(max(math.floor((lo + hi) / 2 + TOLERANCE), first), last)
    sign = 1 if family.cheaper == "higher" else -1
    value = family.value(sign * step)
    require(value not in values, f"{family.knob} {value} was probed already (a bug in the bisection)")
    return result(value)
