"""Timing and reporting shared by every benchmark family.

Samples are seconds per run. A figure keeps the median and the p90 (always the *slow* side: for rates it
is the rate at the 90th percentile of run times), the number of runs and a unit. Comparisons are ratios
of figures measured in the same invocation, interleaved round by round, so that a noisy neighbour slows
both sides alike; each carries its target and pass/fail.

Samples are taken by bench/sampling.py (its rule: rounds until the watched intervals are tight, at planned
looks, within a budget; bench.timing re-exports ``Case``, ``Timed``, ``interleaved`` and ``measure`` for the
families). Each figure keeps its samples, rounds, the 95% interval of its median and why its rounds stopped
(``converged``, ``cap`` or ``budget``: the interval was not reached); each comparison its interval and sample
counts. A target is *settled* in a run only when its interval lies on one side of the target (``outcome``): a
ratio whose interval straddles the target is ``unsettled``, not passed, whatever its median, and so is a
measured target with no interval at all (one reading, or samples not taken in rounds), unless it is marked
``exact``: a count that has no sampling noise (calls lost or crossed, objects missing, tensors copied), which
its value decides.

Every figure and comparison has a ``kind``: ``measured`` (timed or counted here), ``derived`` (written
down from how the baseline works, not observed: e.g. torch.rpc's 2 messages per call), ``by construction``
(a ratio whose size the set-up fixes, e.g. N round trips against one) or ``unpaired`` (one side measured
alone, not interleaved with the other). Only measured comparisons carry targets. A comparison's ``basis``
says what each side does: ``like-for-like`` or what differs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.machine import loadavg, machine_info
from bench.sampling import Case, Timed, interleaved, interval, measure, new_seed

__all__ = [
    "LIKE_FOR_LIKE",
    "Case",
    "Figure",
    "Report",
    "Target",
    "Timed",
    "fmt",
    "interleaved",
    "measure",
    "outcome",
    "percentile",
]

SCALE = {"s": 1.0, "ms": 1e3, "us": 1e6}

KINDS = ("measured", "derived", "by construction", "unpaired")
LIKE_FOR_LIKE = "like-for-like"


@dataclass
class Figure:
    median: float
    p90: float
    runs: int
    unit: str
    note: str = ""
    kind: str = "measured"
    ci95: list[float] | None = None  # 95% interval of the median (rounds bootstrap), where sampled in rounds
    rounds: int | None = None  # interleaved rounds the samples came from
    stop: str = ""  # why the rounds stopped: converged (interval within +-TOL), cap or budget


@dataclass
class Target:
    name: str
    value: float
    op: str  # "<=", ">=", "<"; "" for a ratio reported without a target
    target: float | None
    unit: str  # "x" for ratios
    detail: str
    kind: str = "measured"
    basis: str = ""  # for ratios: LIKE_FOR_LIKE, or what differs between the two sides
    ci95: list[float] | None = None  # 95% interval of the ratio (paired rounds bootstrap)
    samples: list[int] | None = None  # samples behind numerator and denominator
    stop: str = ""  # "converged" if both sides' rounds stopped on the interval rule, else cap or budget
    exact: bool = False  # an exact count (no sampling noise): its value decides without an interval

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.kind != "measured" and self.target is not None:
            raise ValueError(f"{self.name}: a {self.kind} figure cannot be a target")

    @property
    def outcome(self) -> str:
        """Its verdict in this run (:func:`outcome`): pass, fail or unsettled; "" without a target."""
        return outcome(self.value, self.op, self.target, self.ci95, self.exact)


def percentile(samples: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples, dtype=float), q))


def outcome(value: float, op: str, target: float | None, ci95: Sequence[float] | None, exact: bool = False) -> str:
    """A target's verdict in one run: ``pass`` or ``fail`` when its 95% interval lies wholly on one side of
    the target, ``unsettled`` when it straddles it or when there is no interval; an ``exact`` count (no
    sampling noise) is decided by its value. "" for no target."""
    if target is None or not op:
        return ""
    if not ci95 and not exact:  # one noisy reading: not settled whatever its value
        return "unsettled"
    lo, hi = (value, value) if not ci95 else (min(ci95[0], value), max(ci95[1], value))
    good = {"<=": hi <= target, ">=": lo >= target, "<": hi < target}[op]
    bad = {"<=": lo > target, ">=": hi < target, "<": lo >= target}[op]
    return "pass" if good else "fail" if bad else "unsettled"


# -- the report ---------------------------------------------------------------------------------------


class Report:
    def __init__(self) -> None:
        self.started = time.time()
        self.figures: dict[str, dict[str, Figure]] = {}
        self.targets: list[Target] = []
        self.skipped: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.notes: dict[str, list[str]] = {}
        self.family_s: dict[str, float] = {}  # wall time of each family run, seconds
        self._draws: dict[tuple[str, str], np.ndarray] = {}  # bootstrap medians of figures sampled in rounds
        self.machine = machine_info()

    # figures
    def add(self, family: str, name: str, fig: Figure) -> Figure:
        self.figures.setdefault(family, {})[name] = fig
        return fig

    def time(self, family: str, name: str, samples: Sequence[float], unit: str = "us", note: str = "") -> Figure:
        k = SCALE[unit]
        fig = Figure(float(np.median(samples)) * k, percentile(samples, 90) * k, len(samples), unit, note)
        return self._sampled(family, name, fig, samples, lambda m: m * k)

    def rate(
        self, family: str, name: str, samples: Sequence[float], amount: float, unit: str, note: str = ""
    ) -> Figure:
        """``amount`` (items, bytes scaled to ``unit``) per run divided by each run's seconds."""
        med, slow = float(np.median(samples)), percentile(samples, 90)
        fig = Figure(amount / med, amount / slow, len(samples), unit, note)
        return self._sampled(family, name, fig, samples, lambda m: amount / m)

    def _sampled(self, family: str, name: str, fig: Figure, samples: Sequence[float], f: Any) -> Figure:
        """Keep the bootstrap draws of the figure's median (samples timed in rounds) for its interval and the
        intervals of the ratios it takes part in."""
        if isinstance(samples, Timed) and samples:
            draws = f(samples.boot_medians())
            self._draws[family, name] = draws
            # no stop recorded: a fixed number of samples (e.g. starts, readings), all taken: the cap
            fig.ci95, fig.rounds, fig.stop = interval(draws), samples.n_rounds, samples.stop or "cap"
        return self.add(family, name, fig)

    def same_as(self, family: str, name: str, source: str, note: str) -> Figure:
        """A figure that is another one of this run under a second name (e.g. the faster of two baselines)."""
        fig = replace(self.get(family, source), note=note)
        if (family, source) in self._draws:
            self._draws[family, name] = self._draws[family, source]
        return self.add(family, name, fig)

    def values(self, family: str, name: str, values: Sequence[float], unit: str, note: str = "") -> Figure:
        """A figure from several readings in their own unit (MB, bytes), each its own sample: the median, the
        p90 and the 95% interval of the median (bootstrap over the readings), as ``time`` gives timed ones."""
        v = Timed(values, seed=new_seed())
        fig = Figure(float(np.median(v)), percentile(v, 90), len(v), unit, note)
        return self._sampled(family, name, fig, v, lambda m: m)

    def count(self, family: str, name: str, value: float, unit: str, note: str = "", kind: str = "measured") -> Figure:
        """A single number: counted (``measured``) or written down from how a baseline works (``derived``)."""
        return self.add(family, name, Figure(float(value), float(value), 1, unit, note, kind))

    def get(self, family: str, name: str) -> Figure:
        return self.figures[family][name]

    # targets
    def target(
        self,
        name: str,
        value: float,
        op: str,
        target: float | None,
        unit: str,
        detail: str,
        *,
        kind: str = "measured",
        basis: str = "",
        exact: bool = False,
    ) -> Target:
        """A target on a value of this run. With no interval (``ci95``, set by ``on_figure`` and ``ratio``) its
        outcome is ``unsettled`` unless ``exact``: a count with no sampling noise (calls lost, objects missing)."""
        t = Target(name, float(value), op, None if target is None else float(target), unit, detail, kind, basis)
        t.exact = exact
        self.targets.append(t)
        return t

    def on_figure(self, name: str, fig: tuple[str, str], op: str, target: float, *, basis: str) -> Target:
        """A target on one measured figure of this run (not a ratio): it carries the figure's interval,
        samples and stop, so that its outcome is settled only when the interval is clear of the target."""
        f = self.get(*fig)
        t = self.target(name, f.median, op, target, f.unit, fig[1], basis=basis)
        t.ci95, t.samples, t.stop = f.ci95, [f.runs], f.stop
        return t

    def ratio(
        self,
        name: str,
        num: tuple[str, str],
        den: tuple[str, str],
        op: str = "",
        target: float | None = None,
        *,
        kind: str = "measured",
        basis: str = LIKE_FOR_LIKE,
    ) -> Target:
        """median(num) / median(den) of two figures of this run (no target: reported for information).

        ``basis``: LIKE_FOR_LIKE, or what differs between the sides (shown beside a like-for-like ratio)."""
        a, b = self.get(*num), self.get(*den)
        t = self.target(name, a.median / b.median, op, target, "x", f"{num[1]} / {den[1]}", kind=kind, basis=basis)
        t.samples = [a.runs, b.runs]
        if num in self._draws and den in self._draws:
            t.ci95 = interval(self._draws[num] / self._draws[den])
            t.stop = "converged" if a.stop == b.stop == "converged" else (b.stop if a.stop == "converged" else a.stop)
        return t

    def note(self, family: str, text: str) -> None:
        self.notes.setdefault(family, []).append(text)

    # output
    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "duration_s": round(time.time() - self.started, 1),
            "family_s": self.family_s,
            "load_average_end": loadavg(),
            "figures": {f: {n: asdict(x) for n, x in figs.items()} for f, figs in self.figures.items()},
            "targets": [asdict(t) | {"outcome": t.outcome} for t in self.targets],
            "skipped": self.skipped,
            "errors": self.errors,
            "notes": self.notes,
        }

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    def table(self) -> str:
        lines = []
        for family, figs in self.figures.items():
            lines.append(f"\n## {family}")
            width = max(52, *(len(n) for n in figs))
            lines.append(f"{'':{width}} {'median':>12} {'p90':>12} {'runs':>6}  unit")
            for name, f in figs.items():
                kind = "" if f.kind == "measured" else f"  ({f.kind}, not measured)"
                ci = f"  [{fmt(f.ci95[0])}, {fmt(f.ci95[1])}] {f.rounds} rounds, {f.stop}" if f.ci95 else ""
                lines.append(f"{name:{width}} {fmt(f.median):>12} {fmt(f.p90):>12} {f.runs:>6}  {f.unit}{kind}{ci}")
            for text in self.notes.get(family, []):
                lines.append(f"  note: {text}")
        if self.targets:
            lines.append("\n## targets (ratios of medians measured in this run)")
            width = max(len(t.name) for t in self.targets)
            for t in self.targets:
                mark = t.outcome.upper() or "info"
                value = f"{fmt(t.value)}{t.unit}"
                goal = "" if t.target is None else f"{t.op} {fmt(t.target)}{t.unit}"
                label = ", ".join(x for x in (t.kind if t.kind != "measured" else "", t.basis) if x)
                ci = f" 95% [{fmt(t.ci95[0])}, {fmt(t.ci95[1])}] {t.stop}," if t.ci95 else ""
                lines.append(f"{mark:9}  {t.name:{width}} {value:>13} {goal:10} {ci} [{label}] ({t.detail})")
        if self.family_s:
            total = sum(self.family_s.values())
            lines.append(f"\n## wall time by family ({total:.0f} s in all)")
            lines += [f"{name:20} {seconds:7.1f} s" for name, seconds in self.family_s.items()]
        for family, why in self.skipped.items():
            lines.append(f"skipped {family}: {why}")
        for family, why in self.errors.items():
            lines.append(f"ERROR in {family}: {why}")
        return "\n".join(lines)


def fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"
