"""Aggregate kept runs (``bench/runs/*.json``) into one result: medians over runs with their spread.

A figure's aggregate is the median of the runs' medians, with the min and max over runs (the spread a
reader should expect between runs of ``make bench`` here). A comparison's value is aggregated the same
way. In each run a target is ``pass`` or ``fail`` only when its 95% interval lies wholly on one side of
the target, else ``unsettled``; a target with no interval is ``unsettled`` too, unless it is an exact count
(``exact``: calls lost, objects missing), which its value decides (``bench.timing.outcome``, recomputed here
from each run's value, interval and ``exact``; a run kept before ``exact`` was recorded has no exact targets).
A target *passes* (``passed``) only if it passed, settled, in more than half of the runs. Its verdict
(``verdict``), with P settled passes, F settled fails and U unsettled runs out of N:

* ``flaky``: P > 0 and F > 0 (settled runs disagree; ``passed`` says which side has the majority, if any);
* ``pass``: F = 0 and P > N/2 (every settled run passed and they are most runs: e.g. 3 of 3, or 2 of 3 with
  one unsettled);
* ``fail``: P = 0 and F > N/2 (e.g. 3 of 3 failed, or 2 of 3 with one unsettled);
* ``unsettled``: otherwise (no disagreement, but settled runs are not a majority: the figure is too close to
  its target for this host's noise to call).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.timing import outcome


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if "figures" not in data or "targets" not in data:
        raise ValueError(f"{path} is not a bench run (no figures/targets)")
    return data


def verdict(passes: int, runs: int, unsettled: int = 0) -> str:
    """``passes`` settled passes and ``unsettled`` runs out of ``runs`` (the rest failed, settled): the rules
    in the module's docstring."""
    fails = runs - passes - unsettled
    if passes and fails:
        return "flaky"
    if passes > runs / 2:
        return "pass"
    if fails > runs / 2:
        return "fail"
    return "unsettled"


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": list(values)}


def _family_seconds(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each family's wall time per run (runs made before it was recorded have none)."""
    per: dict[str, list[float]] = {}
    for run in runs:
        for family, seconds in run.get("family_s", {}).items():
            per.setdefault(family, []).append(seconds)
    return {family: _spread(values) for family, values in per.items()}


def aggregate(runs: Sequence[dict[str, Any]], names: Sequence[str] = ()) -> dict[str, Any]:
    """One result from several run reports (in run order)."""
    figures: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        for family, figs in run["figures"].items():
            for name, fig in figs.items():
                first = {"unit": fig["unit"], "kind": fig.get("kind", "measured"), "note": fig.get("note", "")}
                entry = figures.setdefault(family, {}).setdefault(name, first | {"per_run": []})
                entry["per_run"].append((fig["median"], fig["runs"], fig.get("ci95"), fig.get("stop", "")))
    for figs in figures.values():
        for entry in figs.values():
            per_run = entry.pop("per_run")
            entry.update(_spread([m for m, *_ in per_run]))
            entry["samples_per_run"] = [n for _, n, *_ in per_run]
            if any(ci for _, _, ci, _ in per_run):  # runs sampled by the interval rule (older runs: none)
                entry["ci95_per_run"] = [ci for _, _, ci, _ in per_run]
                entry["stop_per_run"] = [stop for *_, stop in per_run]

    targets: dict[str, dict[str, Any]] = {}
    for run in runs:
        for t in run["targets"]:
            entry = targets.setdefault(
                t["name"],
                {
                    k: t.get(k, d)
                    for k, d in (("op", ""), ("target", None), ("unit", ""), ("detail", ""), ("kind", "measured"))
                }
                | {"basis": t.get("basis", ""), "values": [], "outcomes": [], "sampled": []},
            )
            entry["values"].append(t["value"])
            entry["outcomes"].append(
                outcome(t["value"], t["op"], t["target"], t.get("ci95"), bool(t.get("exact", False)))
            )
            entry["sampled"].append((t.get("samples"), t.get("ci95"), t.get("stop", "")))
    out_targets = []
    for name, entry in targets.items():
        values, outcomes, sampled = entry.pop("values"), entry.pop("outcomes"), entry.pop("sampled")
        item = {"name": name, **entry, **_spread(values), "runs": len(values)}
        if any(ci for _, ci, _ in sampled):  # the interval rule's record (older runs have none)
            item["samples_per_run"] = [n for n, _, _ in sampled]
            item["ci95_per_run"] = [ci for _, ci, _ in sampled]
            item["stop_per_run"] = [stop for *_, stop in sampled]
        if entry["target"] is not None:
            passes, unsettled = outcomes.count("pass"), outcomes.count("unsettled")
            item |= {
                "passes": passes,
                "fails": outcomes.count("fail"),
                "unsettled": unsettled,
                "outcome_per_run": outcomes,
                "passed": passes > len(values) / 2,
                "verdict": verdict(passes, len(values), unsettled),
            }
        out_targets.append(item)

    first = runs[0]
    return {
        "runs": len(runs),
        "run_files": list(names),
        "batch": first.get("batch"),
        "quick": any(r.get("quick") for r in runs),
        "machine": first["machine"],
        "load_average": [
            {"start": r["machine"].get("load_average_start"), "end": r.get("load_average_end")} for r in runs
        ],
        "duration_s": [r["duration_s"] for r in runs],
        "family_s": _family_seconds(runs),
        "figures": figures,
        "targets": out_targets,
        "notes": first.get("notes", {}),
        "errors": {n: r["errors"] for n, r in zip(names or range(len(runs)), runs, strict=False) if r["errors"]},
        "skipped": first.get("skipped", {}),
    }
