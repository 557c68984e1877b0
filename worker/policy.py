"""The data owner's release rules (``plan-worker --policy policy.toml``): what private-derived results may leave.

Without a policy nothing computed from private data ever leaves the worker. A policy approves plans by
fingerprint (the sha256 of the plan bytes, which is also its plan id) and names, per output, how it may
leave::

    delta = 1e-5                       # for the privacy accounting report (default 1e-5)
    max_epsilon = 8.0                  # optional: the data's privacy budget (epsilon at delta), all clients and plans

    [[plan]]
    fingerprint = "3f2a…"              # plan-worker review PLAN.onnx prints it, and this snippet
    name = "cnn training step"         # for people and the audit log
    min_batch = 16                     # refuse a release computed on fewer rows (leading axis of private args)
    outputs.loss = "as_is"             # the value itself
    outputs."new.param.fc.weight" = { update = "param.fc.weight" }   # new - old of the input it updates
    update = { clip_norm = 1.0, noise_multiplier = 1.1 }             # optional, for every `update` output
    inputs."hyper.lr" = { min = 0.0, max = 0.1 }                      # bounds or pins (`equal`) of inputs

``update`` releases the change of a bound parameter since the client last stored it (over every step of
this plan in between), clipped to ``clip_norm`` (L2, per tensor) and with Gaussian noise of standard
deviation ``noise_multiplier * clip_norm`` added by the worker, once per stored result. ``max_epsilon``
bounds the epsilon spent on noised releases of the worker's data, over all clients and plans (their events
composed): a release that would take it past the budget is refused (``private_data``), and the result stays
unreleased.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class PolicyError(ValueError):
    """A policy file that cannot be used: the message names the file, the entry and what is wrong."""


@dataclass(frozen=True)
class Release:
    """How one output may leave: ``as_is``, or ``update`` of input ``param``."""

    how: str
    param: str = ""


@dataclass(frozen=True)
class Bound:
    """Allowed values of a scalar input: ``equal``, or within [``min``, ``max``]."""

    equal: float | None = None
    min: float | None = None
    max: float | None = None

    def check(self, value: float) -> str | None:
        if self.equal is not None and value != self.equal:
            return f"must be {self.equal}"
        if self.min is not None and not value >= self.min:
            return f"must be at least {self.min}"
        if self.max is not None and not value <= self.max:
            return f"must be at most {self.max}"
        return None

    def __str__(self) -> str:
        if self.equal is not None:
            return f"= {self.equal}"
        return f"in [{'-inf' if self.min is None else self.min}, {'inf' if self.max is None else self.max}]"


@dataclass(frozen=True)
class Rule:
    fingerprint: str
    name: str
    outputs: dict[str, Release]
    inputs: dict[str, Bound] = field(default_factory=dict)
    min_batch: int = 0
    clip_norm: float | None = None
    noise_multiplier: float = 0.0

    def describe(self) -> str:
        parts = [f"{o}: {r.how}" for o, r in self.outputs.items()]
        if self.clip_norm is not None:
            parts.append(f"clip_norm {self.clip_norm}")
        if self.noise_multiplier:
            parts.append(f"noise_multiplier {self.noise_multiplier}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Policy:
    rules: dict[str, Rule]
    delta: float = 1e-5
    path: str = ""
    max_epsilon: float | None = None  # the data's privacy budget over every client's noised releases (None: unbounded)


def load(path: str | Path) -> Policy:
    """The policy in a TOML file; PolicyError says what is wrong and where."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise PolicyError(f"--policy {str(p)!r}: cannot read it ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PolicyError(f"--policy {str(p)!r}: not valid TOML ({e})") from None
    return parse(doc, str(p))


def parse(doc: dict[str, Any], where: str = "policy") -> Policy:
    unknown = set(doc) - {"plan", "delta", "max_epsilon"}
    if unknown:
        raise PolicyError(
            f"{where}: unknown top-level keys {sorted(unknown)} (expected [[plan]] tables, delta and max_epsilon)"
        )
    delta = _number(doc.get("delta", 1e-5), f"{where}: delta")
    if not 0 < delta < 1:
        raise PolicyError(f"{where}: delta must be between 0 and 1, got {delta}")
    max_epsilon = None
    if "max_epsilon" in doc:
        max_epsilon = _number(doc["max_epsilon"], f"{where}: max_epsilon")
        if not max_epsilon > 0:
            raise PolicyError(f"{where}: max_epsilon must be positive, got {max_epsilon}")
    plans = doc.get("plan", [])
    if not isinstance(plans, list):
        raise PolicyError(f"{where}: 'plan' must be an array of tables ([[plan]])")
    rules: dict[str, Rule] = {}
    for i, entry in enumerate(plans):
        rule = _rule(entry, f"{where}: plan #{i + 1}")
        if rule.fingerprint in rules:
            raise PolicyError(f"{where}: plan #{i + 1}: fingerprint {rule.fingerprint[:12]}… is approved twice")
        rules[rule.fingerprint] = rule
    noised = [r.name or r.fingerprint[:12] for r in rules.values() if r.noise_multiplier]
    if noised:
        try:  # imported here (seconds) rather than at the first noised release, which it would stall
            from dp_accounting.rdp import rdp_privacy_accountant  # noqa: F401
        except ImportError:
            raise PolicyError(
                f"{where}: plan {noised[0]!r} adds noise, whose privacy accounting needs dp-accounting: "
                "pip install 'planwire[dp]'"
            ) from None
    return Policy(rules, delta, where, max_epsilon)


def _rule(entry: Any, at: str) -> Rule:
    if not isinstance(entry, dict):
        raise PolicyError(f"{at}: must be a table")
    unknown = set(entry) - {"fingerprint", "name", "outputs", "inputs", "min_batch", "update"}
    if unknown:
        raise PolicyError(f"{at}: unknown keys {sorted(unknown)}")
    fp = entry.get("fingerprint")
    if not isinstance(fp, str) or len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise PolicyError(f"{at}: fingerprint must be the plan's sha256 (64 lowercase hex digits), got {fp!r}")
    at = f"{at} ({entry.get('name') or fp[:12]})"
    outputs: dict[str, Release] = {}
    raw_outputs = entry.get("outputs", {})
    if not isinstance(raw_outputs, dict) or not raw_outputs:
        raise PolicyError(f"{at}: 'outputs' must name at least one output and how it may leave")
    for name, how in raw_outputs.items():
        if how == "as_is":
            outputs[name] = Release("as_is")
        elif isinstance(how, dict) and set(how) == {"update"} and isinstance(how["update"], str) and how["update"]:
            outputs[name] = Release("update", how["update"])
        else:
            raise PolicyError(
                f'{at}: output {name!r}: expected "as_is" or {{ update = "INPUT" }} (the parameter input it '
                f"updates), got {how!r}"
            )
    inputs: dict[str, Bound] = {}
    for name, b in entry.get("inputs", {}).items():
        if not isinstance(b, dict) or not b or set(b) - {"equal", "min", "max"}:
            raise PolicyError(f"{at}: input {name!r}: expected a table with equal, or min and/or max")
        inputs[name] = Bound(**{k: _number(v, f"{at}: input {name!r} {k}") for k, v in b.items()})
    min_batch = entry.get("min_batch", 0)
    if not isinstance(min_batch, int) or isinstance(min_batch, bool) or min_batch < 0:
        raise PolicyError(f"{at}: min_batch must be a whole number ≥ 0, got {min_batch!r}")
    update = entry.get("update", {})
    if not isinstance(update, dict) or set(update) - {"clip_norm", "noise_multiplier"}:
        raise PolicyError(f"{at}: update must be a table with clip_norm and/or noise_multiplier")
    clip = update.get("clip_norm")
    clip = None if clip is None else _number(clip, f"{at}: update.clip_norm")
    noise = _number(update.get("noise_multiplier", 0.0), f"{at}: update.noise_multiplier")
    if clip is not None and not clip > 0:
        raise PolicyError(f"{at}: update.clip_norm must be positive, got {clip}")
    if noise < 0:
        raise PolicyError(f"{at}: update.noise_multiplier must be ≥ 0, got {noise}")
    if noise and clip is None:
        raise PolicyError(f"{at}: update.noise_multiplier needs update.clip_norm (the noise is scaled to it)")
    if (clip is not None or noise) and not any(r.how == "update" for r in outputs.values()):
        raise PolicyError(f"{at}: update.clip_norm/noise_multiplier given but no output is released as an update")
    return Rule(fp, str(entry.get("name", "")), outputs, inputs, min_batch, clip, noise)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PolicyError(f"{what} must be a finite number, got {value!r}")
    return float(value)
