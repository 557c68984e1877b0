"""Releases: the only way a result computed from private data leaves the worker, by the owner's policy.

A run of an approved plan (worker/policy.py) that reads private data stores each private output with a
:class:`Pending` release: what its rule allows (``as_is`` or ``update``), the base of an update (the parameter
as the client last stored it) and the fewest rows of private data its computation read. The first read
(``get``, ``fetch``, ``inline_max``) computes the released value once (clip and noise for an update), records
it in the audit log and the client's privacy accounting, and every later read of that result returns the same
value: reading twice never averages the noise away.

The accounting keeps, per client, how many noised releases it was given at each noise multiplier, and
its epsilon is dp-accounting's for exactly those events. A policy's ``max_epsilon`` refuses a release
that would take the worker's data past it: every client's noised releases composed (a per-client budget
would give a new connection, or a new CURVE key, a fresh budget on the same data). With ``--state-dir`` a
:class:`Journal` (worker/state.py) makes the spent budget, then the released value, durable before the
release returns (so before the reply leaves): a restarted worker neither forgets a budget spent nor draws new
noise for a value already released.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import numpy as np

from planwire.transport.errors import ProtocolError
from planwire.worker.owners import label
from planwire.worker.policy import Policy, Release, Rule
from planwire.worker.store import ClientId, Entry

log = logging.getLogger("planwire.worker")
_encoder = msgspec.json.Encoder()


@dataclass
class Pending:
    """How a stored private-derived result may leave (set by the run that made it). ``rows``: the fewest rows
    of the worker's data that went into it, through every private input of every run before."""

    rule: Rule
    output: str
    how: Release
    base: np.ndarray | None
    rows: int
    released: np.ndarray | None = None

    @property
    def ready(self) -> bool:
        """Whether a read may release it (enough rows for the rule's min_batch)."""
        return self.rows >= self.rule.min_batch


class Journal(Protocol):
    """Where a Releaser makes its changes durable (worker/state.py); each call returns once they are kept,
    or raises (ProtocolError) and nothing was released."""

    def spent(self, spent: dict[ClientId, dict[float, int]]) -> None:
        """The whole accounting after one more noised release (written before the release is made)."""

    def released(self, client: ClientId, key: str, entry: Entry) -> None:
        """``entry.pending.released`` was just computed for ``client``'s ``key``."""


def epsilon_of(events: dict[float, int], delta: float) -> float:
    """Epsilon at ``delta`` after ``events`` ({noise multiplier: count} of Gaussian releases), by dp-accounting's
    RDP accountant (each release counted in full: no amplification by sampling is assumed)."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant()
    for noise, count in sorted(events.items()):
        acc.compose(dp_event.GaussianDpEvent(noise), count)
    return float(acc.get_epsilon(delta))


class Releaser:
    """Applies the policy at runs and reads; writes the audit log; keeps per-client privacy accounting."""

    def __init__(self, policy: Policy | None = None, audit: str | None = None) -> None:
        self.policy = policy  # replaced whole on reload (SIGHUP): readers see the old or the new one
        # one unbuffered O_APPEND write per line: whole lines, even with another process appending
        self._audit = open(audit, "ab", buffering=0) if audit else None  # noqa: SIM115
        self._lock = threading.Lock()
        self._releasing = threading.Lock()
        self._spent: dict[ClientId, dict[float, int]] = {}  # client -> {noise multiplier: noised releases}
        self._total: Counter[float] = Counter()  # every client's noised releases together (_spent summed)
        self._epsilon: dict[str, float] = {}  # owner label -> epsilon spent so far (noised releases only)
        self.journal: Journal | None = None  # --state-dir: where releases and the accounting are kept
        self.blocked = ""  # why no noised release can be made (its accounting could not be restored)
        self.releases: Counter[str] = Counter()  # owner label -> private-derived tensors released to it
        self._rng = np.random.default_rng()

    def close(self) -> None:
        if self._audit is not None:
            self._audit.close()

    # -- at a run ----------------------------------------------------------------------------------

    def prepare(
        self,
        pid: str,
        plan_name: str,
        inputs: Sequence[str],
        outputs: Sequence[str],
        args: Sequence[np.ndarray],
        private_args: dict[int, Entry],
        private_outputs: frozenset[int],
        client: ClientId,
    ) -> dict[int, Pending]:
        """The releases a run of plan ``pid`` on private data may make, by output index; refuses
        (``private_data``) a run whose inputs break the rule's bounds, before it runs."""
        policy = self.policy
        rule = policy.rules.get(pid) if policy is not None else None
        if rule is None:
            return {}
        for name, bound in rule.inputs.items():
            if name not in inputs:
                continue  # the rule names an input this plan does not have: nothing to check
            value = args[inputs.index(name)]
            why = "must be a single number" if value.size != 1 else bound.check(float(value.reshape(-1)[0]))
            if why:
                message = (
                    f"plan {plan_name!r} is approved by the data owner's policy only with input {name!r} {bound}: "
                    f"this run's {why} (got {value.reshape(-1)[:4].tolist()}); nothing ran"
                )
                self.audit("refused", client, rule, plan_name, [], [], reason=message)
                raise ProtocolError("private_data", message)
        rows = min((e.rows for e in private_args.values()), default=0)
        out: dict[int, Pending] = {}
        for i in private_outputs:
            how = rule.outputs.get(outputs[i])
            if how is None:
                continue
            base = None
            if how.how == "update":
                if how.param not in inputs:
                    continue
                j = inputs.index(how.param)
                before = private_args.get(j)
                if before is None:
                    base = args[j]  # the client's own value: the update is measured from it
                elif (
                    isinstance(before.pending, Pending)
                    and before.pending.rule is rule
                    and before.pending.base is not None
                ):
                    base = before.pending.base  # a chain of steps of this plan: from where the client left it
                else:
                    continue  # no base the client knows: no update can be released
            out[i] = Pending(rule, outputs[i], how, base, rows)
        return out

    # -- at a read ---------------------------------------------------------------------------------

    def release(self, client: ClientId, key: str, entry: Entry) -> np.ndarray:
        """The value of a private-derived result that may leave, computed once; ProtocolError otherwise."""
        with self._releasing:  # one at a time: the budget is read, checked and charged as one step
            return self._release(client, key, entry)

    def _release(self, client: ClientId, key: str, entry: Entry) -> np.ndarray:
        pending = entry.pending
        if not isinstance(pending, Pending):
            message = (
                f"tensor {key!r} was computed from this worker's private data: it may be described and used by "
                "later runs, but never leaves the worker (only a run of a plan the data owner approved in "
                "plan-worker --policy releases results)"
            )
            self.audit("refused", client, None, "", [key], [entry.array], reason=message)
            raise ProtocolError("private_data", message)
        if pending.released is not None:
            return pending.released
        rule = pending.rule
        if pending.rows < rule.min_batch:
            message = (
                f"tensor {key!r} ({pending.output!r} of plan {rule.name or rule.fingerprint[:12]!r}) was computed on "
                f"{pending.rows} rows of private data; the data owner's policy releases it only from {rule.min_batch}"
            )
            self.audit("refused", client, rule, rule.name, [pending.output], [entry.array], reason=message)
            raise ProtocolError("private_data", message)
        noise = 0.0
        events = None
        epsilon = None
        if pending.how.how == "as_is":
            value = entry.array
        else:
            noise = rule.noise_multiplier
            if noise:  # the budget first: a release it refuses draws no noise
                events, epsilon = self._charge(client, key, entry, pending, noise)
            value = self._update(key, entry.array, pending)
        if events is not None:
            if self.journal is not None:  # durable before the value can leave: a crash can only overcount
                self.journal.spent({**self._spent, client: events})
            with self._lock:
                self._spent[client] = events
                self._total[noise] += 1
                self._epsilon[label(client)] = epsilon  # type: ignore[assignment]
        pending.released = value
        if self.journal is not None and noise:  # noise is drawn once; any other release computes the same again
            self.journal.released(client, key, entry)
        self.releases[label(client)] += 1
        self.audit("released", client, rule, rule.name, [pending.output], [value], noise=noise, epsilon=epsilon)
        return value

    def _charge(
        self, client: ClientId, key: str, entry: Entry, pending: Pending, noise: float
    ) -> tuple[dict[float, int], float]:
        """The client's accounting and epsilon after one more release at ``noise``; refuses (``private_data``)
        one that would take the worker's data past the policy's ``max_epsilon`` (all clients' noised releases
        composed: a client that connects again, or another client, gets no fresh budget on the same data), or
        any while the accounting is unknown."""
        rule = pending.rule
        events = dict(self._spent.get(client, {}))
        events[noise] = events.get(noise, 0) + 1
        epsilon = epsilon_of(events, self.delta)
        budget = self.policy.max_epsilon if self.policy is not None else None
        after = Counter(self._total)  # the running total: a release costs nothing per client
        after[noise] += 1
        message = ""
        if self.blocked:
            message = (
                f"tensor {key!r} is a noised update, and {self.blocked}: no noised release is made until the worker's "
                "operator repairs that record (or removes it, which resets every client's spent budget)"
            )
        elif budget is not None and (total := epsilon_of(dict(after), self.delta)) > budget:
            spent = epsilon_of(dict(self._total), self.delta)
            message = (
                f"tensor {key!r} ({pending.output!r} of plan {rule.name or rule.fingerprint[:12]!r}) would take the "
                f"privacy budget of the worker's data (all clients' noised releases) to epsilon {total:.4g} (spent "
                f"so far: {spent:.4g}, at delta {self.delta:g}), past the data owner's max_epsilon of {budget:g}: "
                "not released"
            )
        if message:
            self.audit("refused", client, rule, rule.name, [pending.output], [entry.array], reason=message)
            raise ProtocolError("private_data", message)
        return events, epsilon

    def restore(self, spent: dict[ClientId, dict[float, int]]) -> None:
        """The accounting a state directory kept (worker/state.py), before anything is served."""
        with self._lock:
            self._spent = {c: dict(e) for c, e in spent.items() if e}
            self._total = sum((Counter(e) for e in self._spent.values()), Counter())
            self._epsilon = {label(c): epsilon_of(e, self.delta) for c, e in self._spent.items()}

    def _update(self, key: str, array: np.ndarray, pending: Pending) -> np.ndarray:
        if array.dtype.kind != "f" or pending.base is None or pending.base.shape != array.shape:
            raise ProtocolError(
                "private_data", f"tensor {key!r}: an update is released only for floating-point parameters"
            )
        rule = pending.rule
        delta = array.astype(np.float64) - pending.base.astype(np.float64)
        if rule.clip_norm is not None:
            norm = float(np.linalg.norm(delta))
            if norm > rule.clip_norm:
                delta *= rule.clip_norm / norm
        if rule.noise_multiplier:
            with self._lock:
                delta += self._rng.normal(0.0, rule.noise_multiplier * rule.clip_norm, delta.shape)  # type: ignore[operator]
        return delta.astype(array.dtype)

    @property
    def delta(self) -> float:
        """The delta of the privacy accounting (the policy's, default 1e-5)."""
        return self.policy.delta if self.policy is not None else 1e-5

    def spent(self) -> dict[str, float]:
        """Epsilon spent so far per owner label (owners with a noised release only); any thread."""
        with self._lock:
            return dict(self._epsilon)

    # -- the audit log -----------------------------------------------------------------------------

    def refused(self, client: ClientId, keys: Sequence[str], entries: Sequence[Entry], reason: str) -> None:
        """Record a refused read of private-derived data."""
        for key, entry in zip(keys, entries, strict=True):
            pending = entry.pending if isinstance(entry.pending, Pending) else None
            rule = pending.rule if pending is not None else None
            name = rule.name if rule is not None else ""
            self.audit("refused", client, rule, name, [key], [entry.array], reason=reason)

    def audit(
        self,
        event: str,
        client: ClientId,
        rule: Rule | None,
        plan_name: str,
        outputs: Sequence[str],
        arrays: Sequence[np.ndarray],
        *,
        noise: float = 0.0,
        epsilon: float | None = None,
        reason: str = "",
    ) -> None:
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "event": event,
            "client": label(client),
            "plan": rule.fingerprint if rule is not None else "",
            "plan_name": plan_name,
            "outputs": list(outputs),
            "shapes": [list(a.shape) for a in arrays],
            "bytes": sum(int(a.nbytes) for a in arrays),
            "rule": rule.describe() if rule is not None else "none",
        }
        if noise:
            record["noise_multiplier"] = noise
            record["clip_norm"] = rule.clip_norm if rule is not None else None
        if epsilon is not None:
            record["epsilon"] = epsilon
            record["delta"] = self.policy.delta if self.policy is not None else 1e-5
        if reason:
            record["reason"] = reason
        if event == "released":
            log.info(
                "released %s of plan %r to client %s (%s)", list(outputs), plan_name, label(client), record["rule"]
            )
        if self._audit is not None:
            with self._lock:
                self._audit.write(_encoder.encode(record) + b"\n")  # msgspec: a few µs per release
