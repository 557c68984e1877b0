"""Chained runs: a run that reads outputs of the run the runner executes joins the window behind it (a training
step behind the step before, each reading the state the one before writes), so that the supervisor answers
one step and validates and sends the next while the runner executes the one between: neither idles.

A run may be chained behind the head of the window (the run executing, or next to) when it is the same
owner's, nothing else in the window writes what it reads or writes, and every output it reads has a dtype
and shape known before the head finishes: the plan declares them static (a training step's state). Its
arguments are validated against those (``Ahead``); it is sent naming the handles the runner will hold the
head's outputs under (the runner executes in order). Outputs of the head that it neither overwrites nor
fetches come back with the head's answer (``save``), so a crash of the chained run loses nothing else, as
the window requires of any run behind another. Not under ``--state-dir`` (a stored result is written to disk
on the host at once, which a runner busy with the next step cannot give), nor for private outputs, nor for
plans with inputs of unknown rank.

The semantics are those of waiting. When the chained run is answered, what it read is checked against what
the head stored: the head failed, was cancelled or its outputs were refused (a quota), and the run's answer
is replaced by the error it would have got by waiting (its input failed, in the same words); an output of
another shape than declared is checked against the plan as a waiting run's argument is. A run chained
behind a head that crashed the runner goes to the fresh runner with the stored values (or their failure),
never with inputs that were never produced. A chained run refused as it is validated marks its outputs
failed at once, and again once the head ahead of it has stored them (as it would have, refused after); what
a chained run read is what its producer left when it was answered (``Chain.seen``), not what such a refusal
marked after.
"""

from __future__ import annotations

import math
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

import numpy as np
from msgspec import UNSET

from planwire.transport import dtypes
from planwire.transport import messages as m
from planwire.transport.errors import ProtocolError
from planwire.worker.jobs import RunJob
from planwire.worker.resident import Resident
from planwire.worker.runtime import Signature
from planwire.worker.sandbox import Sandbox
from planwire.worker.service import Service
from planwire.worker.store import ClientId, Entry


class _Nowhere:
    """The keeper of an ``Ahead``: it has no data here, and frees nothing (its producer's Resident does)."""

    def fetch(self, residents: list[Resident]) -> None:
        raise ProtocolError("internal", "an output of a run in flight has no data yet")

    def drop(self, resident: Resident) -> None:
        pass


_NOWHERE = _Nowhere()


class Ahead(Resident):
    """An output of the run in flight, as the run chained behind it reads it: its declared dtype and shape, and
    (once its producer is sent) the handle the runner will hold it under. Made by ``Ahead.held(_NOWHERE, -1,
    ...)``: a step's ~90 at once."""

    __slots__ = ()


@dataclass
class Chain:
    """What a chained run reads from the run ahead of it (``producer``, a window slot): (key, Ahead, output
    index) each."""

    producer: object
    links: list[tuple[str, Ahead, int]] = field(default_factory=list)
    # what the producer left under those keys when it was answered (an Entry, or the error reading it gives):
    # read then, because a run refused behind this one marks the same keys failed before this one is answered
    seen: dict[str, Entry | ProtocolError] | None = None


_declared: weakref.WeakKeyDictionary[Signature, list] = weakref.WeakKeyDictionary()


def declared(ports: Signature) -> list[tuple[np.dtype, tuple[int, ...], int, int] | None]:
    """Each output's (dtype, shape, size, bytes) when the plan declares it static, else None (once per plan)."""
    known = _declared.get(ports)
    if known is None:
        known = _declared[ports] = [
            _kind(dtypes.to_numpy(wire), tuple(shape)) if all(type(d) is int for d in shape) else None
            for _, wire, shape in ports.outputs
        ]
    return known


def _kind(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[np.dtype, tuple[int, ...], int, int]:
    size = math.prod(shape)
    return dtype, shape, size, size * dtype.itemsize


def reads(run: m.Run) -> set[str]:
    """The stored keys ``run`` reads (its arguments by ``ref``)."""
    keys = {a.ref for a in run.args}
    keys.discard(UNSET)  # type: ignore[arg-type]
    return keys  # type: ignore[return-value]


def covers(keys: set[str], run: m.Run) -> bool:
    """Whether ``keys`` hold every output of validated ``run`` (distinct keys) that its answer does not bring back
    (``fetch``): a run writing ``keys`` overwrites all it leaves in the runner."""
    if run.fetch:
        return keys.union([run.outputs[i] for i in run.fetch]).issuperset(run.outputs)
    return keys.issuperset(run.outputs)


class Chains:
    """The window's chained runs (a mixin of worker/window.py's Window)."""

    service: Service
    sandbox: Sandbox
    window: deque

    def _chainable(self, me: ClientId, msg: m.Run, head: object) -> dict | None:
        """What run ``msg`` of owner ``me`` reads of the outputs of ``head`` (the window's head, the same owner's
        run, whose outputs ``msg`` reads or writes): {key: (output index, (dtype, shape, size, bytes))}; None when
        it may not be chained behind it (it waits)."""
        job = head.job  # type: ignore[attr-defined]
        service = self.service
        if head.cancelled or service.durable is not None or type(job) is not RunJob:  # type: ignore[attr-defined]
            return None
        keys = reads(msg)
        known = declared(job.plan.ports)
        chain = {}
        for j, key in enumerate(job.msg.outputs):
            if key in keys:
                if known[j] is None or j in job.private:
                    return None
                chain[key] = (j, known[j])
        if chain and msg.plan in service._any_rank:
            return None
        try:
            service.check_form(msg, me)  # past these, a refusal marks its outputs failed (again later: _refused)
        except ProtocolError:
            return None
        return chain

    def _covered(self, me: ClientId, msg: m.Run, job: object) -> bool:
        """Whether run ``msg`` of owner ``me`` overwrites each output of ``job`` (a run in the window) that does
        not come back with its answer: it may join behind it though ``job`` does not save them."""
        if type(job) is not RunJob or self.service.durable is not None:
            return False
        if self.service.owners.owner(job.origin.client) != me:
            return False
        return covers(set(msg.outputs), job.msg)

    def _spared(self, me: ClientId, msg: m.Run) -> bool:
        """Whether every tensor only the runner holds is stored under an output key of run ``msg`` (owner ``me``),
        so that a crash of it loses nothing it does not overwrite anyway."""
        if self.service.durable is not None:
            return False
        ids = {id(e.array) for e in self.service.store.found(me, msg.outputs) if e is not None}
        return ids.issuperset(map(id, self.sandbox.unsaved.values()))

    def _ahead(self, chain: dict) -> dict[str, Entry]:
        kinds = [kind for _, kind in chain.values()]
        made = Ahead.held(_NOWHERE, -1, [0] * len(kinds), kinds, time.monotonic())
        return {key: Entry(a) for key, a in zip(chain, made, strict=True)}

    def _refused(self, me: ClientId, msg: m.Run, head: object) -> list[tuple[str, str]]:
        """(key, why) of the outputs of refused run ``msg`` that the head writes too: marked failed again once
        the head has stored them."""
        store, again = self.service.store, []
        for key in set(msg.outputs).intersection(head.job.msg.outputs):  # type: ignore[attr-defined]
            try:
                store.entry(me, key)
            except ProtocolError as e:
                if e.code == "run_failed":
                    again.append((key, e.message))
        return again

    def _witness(self, producer: object) -> None:
        """``producer`` (a window slot) was answered, its outputs stored or failed: the runs chained behind it
        keep what they read from it now."""
        store, owner = self.service.store, self.service.owners.owner
        for s in self.window:
            chain = getattr(s, "chain", None)
            if chain is None or chain.producer is not producer or s.job is None:
                continue
            me, keys = owner(s.job.origin.client), [key for key, _, _ in chain.links]
            seen: dict[str, Entry | ProtocolError] = dict(zip(keys, store.found(me, keys), strict=True))  # type: ignore[arg-type]
            for key in [k for k, e in seen.items() if e is None]:  # not there: the error reading it gives
                try:
                    seen[key] = store.entry(me, key)
                except ProtocolError as e:
                    seen[key] = e
            chain.seen = seen

    def _chained_entry(self, chain: Chain, me: ClientId, key: str) -> Entry:
        """The entry chained ``chain``'s run reads under ``key``: what its producer left (ProtocolError if failed)."""
        seen = chain.seen
        if seen is None or key not in seen:
            return self.service.store.entry(me, key)
        entry = seen[key]
        if isinstance(entry, ProtocolError):
            raise ProtocolError(entry.code, entry.message)
        return entry

    def _link(self, chain: Chain, job: RunJob) -> bool:
        """Point chained ``job``'s arguments at the handles of its producer's outputs (sent already, in this
        runner). False when the producer was answered already (a restart): then they are the stored values,
        checked as a waiting run's (ProtocolError as it would get)."""
        producer = chain.producer
        if producer.sent and any(s is producer for s in self.window):  # type: ignore[attr-defined]
            gen, out = self.sandbox.handles.gen, producer.out  # type: ignore[attr-defined]
            for _, ahead, j in chain.links:
                ahead.handle, ahead.gen = (out[j] if j < len(out) else 0), gen
            return True
        self._resolve(job, chain)
        return False

    def _resolve(self, job: RunJob, chain: Chain) -> None:
        """Read chained ``job``'s arguments from the store now, as a run that waited would: ProtocolError when one
        failed (the same words) or does not fit the plan."""
        keys = {key for key, _, _ in chain.links}
        me = self.service.owners.owner(job.origin.client)
        for i, a in enumerate(job.msg.args):
            if a.ref in keys:
                entry = self._chained_entry(chain, me, a.ref)  # type: ignore[arg-type]
                job.args[i], job.entries[i] = entry.array, entry
        job.plan.ports.check(job.args)

    def _settled(self, chain: Chain, job: RunJob, outcome: object) -> object:
        """The outcome of chained ``job`` given what its producer stored: the runner's when it read those very
        outputs (of the declared shapes, or fitting the plan as stored), else the error the run would have got
        by waiting."""
        me, find, seen = self.service.owners.owner(job.origin.client), self.service.store.find, chain.seen
        same = exact = True
        for key, ahead, _ in chain.links:  # what _chained_entry reads (None: failed or gone)
            entry = seen.get(key) if seen is not None else None
            if entry is None:
                entry = find(me, key)
            r = entry.array if isinstance(entry, Entry) else None
            if not isinstance(r, Resident) or r.handle != ahead.handle or r.gen != ahead.gen:
                same = False
            elif r.shape != ahead.shape or r.dtype != ahead.dtype:
                exact = False
        if same and exact:
            return outcome
        try:
            self._resolve(job, chain)
        except ProtocolError as e:
            return e
        if not same:  # its inputs are there but are not what it read (not seen to happen)
            return ProtocolError("internal", f"run #{job.msg.id}: an input changed while it ran; run it again")
        return outcome  # another shape than declared, which the plan takes: what the runner ran on
