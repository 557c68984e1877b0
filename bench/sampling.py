"""Sampling shared by every benchmark family: seconds per call, taken in rounds (bench/timing.py reports them).

Sampling rule (``interleaved``): rounds go on until every watched comparison is tight, i.e. the 95%
interval of its ratio of medians, from a bootstrap that resamples whole rounds (the same rounds for every
case, so the pairing of interleaved samples is kept), lies within +-``TOL`` of the ratio. The interval is
looked at only at planned round counts, the floor ``min_rounds`` and its doublings (2x, 4x, ...) and the
cap ``rounds``, not after every round: a rule that looks after every round and stops at the first tight
interval stops early on a lucky stretch (optional stopping); with 2-4 planned looks that effect is small, and
the interval a figure reports is the plain 95% interval at the round it stopped. ``budget_s`` seconds bound a
figure's rounds as well (never before the floor). Each sample set (:class:`Timed`) keeps the round each
sample came from and why its rounds stopped (``converged``, ``cap`` or ``budget``: the interval was not
reached).

Timed rounds run with the garbage collector on, as a user's calls do: both sides of a comparison are
interleaved round by round, so collections fall on them alike (an earlier version collected before every
block of every case and timed with the collector off, as timeit does: ~0.3 s per collection with torch
loaded, most of a round's cost, for no gain in fairness).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

TOL = 0.05  # a comparison is tight when its ratio's 95% interval is within +-5% of the ratio
BOOT = 400  # bootstrap draws (rounds resampled with replacement)


class Timed(list):
    """Seconds per call of one case, with the round each sample came from: the unit the bootstrap resamples.

    Cases timed in the same interleaved run share ``seed`` and their number of rounds, so their bootstrap
    draws pick the same rounds (paired)."""

    def __init__(self, values: Sequence[float] = (), rounds: Sequence[int] | None = None, seed: int = 0) -> None:
        super().__init__(float(v) for v in values)
        self.round_of = list(range(len(self))) if rounds is None else list(rounds)
        self.seed = seed
        self.stop = ""

    @property
    def n_rounds(self) -> int:
        return len(set(self.round_of))

    def scaled(self, k: float) -> Timed:
        out = Timed([v * k for v in self], self.round_of, self.seed)
        out.stop = self.stop
        return out

    def boot_medians(self, draws: int = BOOT) -> np.ndarray:
        """Medians of ``draws`` resamples of whole rounds (with replacement)."""
        v = np.asarray(self, dtype=float)
        ids = np.asarray(self.round_of)
        order = np.unique(ids)
        pick = np.random.default_rng(self.seed).integers(0, len(order), size=(draws, len(order)))
        per = [v[ids == r] for r in order]
        if len({len(p) for p in per}) == 1:  # every round the same number of samples: one gather
            return np.median(np.stack(per)[pick].reshape(draws, -1), axis=1)
        return np.array([np.median(np.concatenate([per[i] for i in row])) for row in pick])


def interval(draws: np.ndarray) -> list[float]:
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return [float(lo), float(hi)]


def halfwidth(num: Timed, den: Timed | None = None) -> float:
    """Relative half-width of the 95% interval of median(num) / median(den) (of median(num) alone)."""
    est = float(np.median(num)) / (float(np.median(den)) if den is not None else 1.0)
    draws = num.boot_medians() / (den.boot_medians() if den is not None else 1.0)
    lo, hi = interval(draws)
    return max(hi / est - 1.0, 1.0 - lo / est) if est > 0 else float("inf")


def measure(fn: Callable[[], Any], *, runs: int, warmup: int = 3, budget_s: float = 30.0) -> Timed:
    """Seconds per call of ``fn``: ``runs`` calls after ``warmup`` (fewer if the budget runs out, min 3);
    each call is its own round."""
    for _ in range(warmup):
        fn()
    out = Timed()
    clock = time.perf_counter
    end = clock() + budget_s
    for _ in range(runs):
        t0 = clock()
        fn()
        t1 = clock()
        out.append(t1 - t0)
        out.round_of.append(len(out) - 1)
        if t1 > end and len(out) >= 3:
            break
    out.stop = "cap" if len(out) == runs else "budget"
    return out


@dataclass
class Case:
    name: str
    fn: Callable[[], Any]
    per_round: int = 100
    warmup: int = 5


_seeds = iter(range(1, 1 << 30))


def interleaved(
    cases: Sequence[Case],
    *,
    rounds: int,
    budget_s: float = 60.0,
    min_rounds: int = 3,
    watch: Sequence[tuple[str, str | None]] | None = None,
    tol: float = TOL,
) -> dict[str, Timed]:
    """Run every case ``per_round`` times per round, rotating the order each round, until the sampling rule
    holds: at the planned looks (``looks``: the floor ``min_rounds``, its doublings, the cap ``rounds``), stop
    once every pair (numerator, denominator) of case names in ``watch`` has the 95% interval of its ratio of
    medians within +-``tol`` (denominator None: the numerator's median alone; no ``watch``: each case's median
    alone); otherwise at ``rounds`` rounds (the cap) or when ``budget_s`` is spent, but never before the floor
    (a loaded host makes a run longer). Returns seconds per call by case, each a ``Timed`` whose ``stop`` says
    which bound ended it."""
    seed = next(_seeds)
    samples: dict[str, Timed] = {c.name: Timed(seed=seed) for c in cases}
    pairs = [(samples[a], samples[b] if b else None) for a, b in watch or [(c.name, None) for c in cases]]
    for c in cases:
        for _ in range(c.warmup):
            c.fn()
    floor = max(min_rounds, 2)  # a rounds bootstrap needs two rounds at least
    planned = looks(floor, rounds)
    clock = time.perf_counter
    start = clock()
    stop = "cap"
    for r in range(rounds):
        order = list(cases[r % len(cases) :]) + list(cases[: r % len(cases)])
        for c in order:
            fn, out = c.fn, samples[c.name]
            for _ in range(c.per_round):
                t0 = clock()
                fn()
                out.append(clock() - t0)
            out.round_of += [r] * c.per_round
        done = r + 1
        if done in planned and all(halfwidth(a, b) <= tol for a, b in pairs):
            stop = "converged"
            break
        if done == rounds:
            break
        if done >= floor and clock() - start > budget_s:  # the floor holds even under load
            stop = "budget"
            break
    for t in samples.values():
        t.stop = stop
    return samples


def looks(floor: int, cap: int) -> set[int]:
    """The round counts at which ``interleaved`` looks at the intervals: the floor, its doublings, the cap."""
    out, n = {cap}, floor
    while n < cap:
        out.add(n)
        n *= 2
    return out


def new_seed() -> int:
    """A bootstrap seed of its own, for samples not paired with any other (e.g. readings taken alone)."""
    return next(_seeds)
