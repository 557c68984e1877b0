"""Which plans' onnxruntime sessions keep a CPU arena in the sandboxed runner (worker/runner.py), how much the
kept arenas may hold, and which session's arena each held output lives in.

onnxruntime's CPU arena keeps the memory a run freed for the plan's next run. Without it every run maps and
faults in its intermediates afresh: a ResNet-8 training step faulted in ~35 MB of new pages (~8,500 minor
faults), a third of its CPU time. A plan's first run with given argument shapes gives its arena's memory back
as it ends and shows how much it took (the new pages it touched); its later runs keep it while the arenas kept
together may hold at most :data:`KEEP_MB` (twice what their runs touched: the arena grows by doubling); any
other run gives it back as it ends, so a big run's memory does not stay with the runner. onnxruntime never
gives back an arena's first region: a plan whose first run is too big to keep is loaded again without an arena
(as every plan had before, paying the faults). A later run that still faults in new pages (an ``If`` that took
a bigger branch than the first runs did) has that growth counted while the arenas fit :data:`KEEP_MB`, and past
it the plan is loaded again without an arena at once. A run that fails after its arena grew (such a branch, then an
error) is not counted: its plan's session is loaded again with a new arena instead (worker/runner.py), and what
the failed run took goes with the old one. What the arenas keep counts as held by the runner for its
data bound (another plan's run cannot use it).

An output of a run is memory of its session's arena, and keeps the whole arena alive after the session is gone:
so when a session with an arena goes (loaded again, dropped), every output of it the runner still holds is
first copied into memory of its own (worker/devstore.py ``DeviceStore.evacuate``; once, not per run), and the
runner keeps no other reference to a request's outputs past it (a small output sent inline is a view of one: one
kept until the next run kept a dropped session's whole arena, all it had grown to, alive).
"""

from __future__ import annotations

import contextlib
import itertools
import resource

from planwire.transport.graph import Graph, read_graph

KEEP_MB = 256
STRAY = 1 << 20  # new pages a run that keeps its arena may fault in unnoticed (the runner's own allocations)

SIZED_BY_DATA = frozenset(
    {
        *("ConstantOfShape", "Expand", "Tile", "Range", "Resize", "Upsample", "Pad", "OneHot"),
        *("Loop", "Scan", "SequenceMap", "EyeLike", "CenterCropPad", "Col2Im"),
        *("HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix", "DFT", "STFT"),
        *("MaxUnpool", "AffineGrid", "TfIdfVectorizer", "StringSplit"),
    }
)
"""Ops whose output size comes from tensor values (or a subgraph's trip count), not from their inputs' shapes."""

_ALL_SIZES = frozenset({"ConstantOfShape", "Range", "HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix"})
"""Of those, the ops all of whose inputs are sizes (the others' first input is the data)."""


def sizes_follow_shapes(data: bytes) -> bool:
    """Whether every value of a plan is sized by the arguments' shapes alone (a run of data-sized values can take
    far more memory than the first run of the same shapes did, and an arena would keep it): no other domain,
    no local function, no ``Loop``/``Scan``, and every op of :data:`SIZED_BY_DATA` takes its sizes (every input
    but the data, all of ConstantOfShape's and Range's) from values computed from ``Shape`` outputs and
    constants only, as an exported training step's gradients do (``Expand(g, Shape(x))``), never from an
    argument's values. An ``If`` is fine when both its branches are (an exported training step's ReLU-backward
    guard): which branch runs depends on the data, so a later run may take more than the first runs of its
    shapes did; :class:`Arenas` counts that growth or gives the arena up (``kept_run``)."""
    try:
        g = read_graph(data)
    except ValueError:
        return False
    return not g.functions and _follows(g, set())


def _follows(g: Graph, outer: set[str]) -> bool:
    """:func:`sizes_follow_shapes` for a graph read from a plan (or an If branch: ``outer``, the values of the
    enclosing graphs fixed by the plan or by the arguments' shapes)."""
    if g.unread:
        return False
    derived = outer | set(g.initializers)  # values fixed by the plan or by the arguments' shapes
    for n in g.nodes:
        if n.domain:
            return False
        if n.subgraphs:
            if n.op != "If" or len(n.graphs) != 2 or not all(_follows(b, derived) for b in n.graphs):
                return False
            continue  # its outputs are the branch the data chose: not derived
        ins = [i for i in n.inputs if i]
        if n.op in SIZED_BY_DATA:
            sizes = ins if n.op in _ALL_SIZES else ins[1:]
            if not all(i in derived for i in sizes):
                return False
        if n.op in ("Shape", "Size", "Constant") or (ins and all(i in derived for i in ins)):
            derived.update(o for o in n.outputs if o)
    return True


def touched() -> int:
    """Bytes of new pages this process has faulted in so far (minor faults × page size)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * resource.getpagesize()


class Arenas:
    """Which runs keep their plan's onnxruntime CPU arena memory, by (plan, argument shapes), and how much the
    kept arenas may hold (``held``, bytes: with the bytes of the plans that have one, kept to load them again
    without). ``enabled``: sessions have an arena (CPU runners). Each session with an arena has a ``token``
    (its outputs are held under it: worker/devstore.py)."""

    def __init__(self, budget: int, *, enabled: bool) -> None:
        self.budget, self.enabled = budget, enabled
        self.kept: dict[str, int] = {}  # plan -> bytes its arena may keep
        self.keep: dict[tuple, bool] = {}  # (plan, shapes) -> its runs keep their memory
        self.held = 0
        self.grown: dict[str, int] = {}  # plan -> bytes of new pages its keeping runs faulted in so far
        self.data: dict[str, bytes] = {}  # plan -> its bytes, while its session has an arena
        self.token: dict[str, int] = {}  # plan -> the token of its session with an arena
        self._tokens = itertools.count(1)
        self._trim = None
        with contextlib.suppress(Exception):  # glibc: free memory back to the system now (else kept at will)
            import ctypes

            self._trim = ctypes.CDLL(None).malloc_trim

    def arena(self, data: bytes) -> bool:
        """Whether a plan of these bytes gets a session with an arena (its bytes are kept meanwhile, so not for
        big plans: their weights, not their runs, are their memory), and only when its runs' memory follows
        from the argument shapes (:func:`sizes_follow_shapes`): the first run of given shapes then shows what
        a later one takes."""
        return (
            self.enabled
            and len(data) <= self.budget // 4
            and self.held + len(data) <= self.budget
            and sizes_follow_shapes(data)
        )

    def loaded(self, pid: str, data: bytes | None) -> int:
        """Plan ``pid`` has a new session, with an arena when ``data`` (its bytes) is given; returns the token
        its outputs are held under (0: no arena). The previous session's token must have been evacuated."""
        self.drop(pid)
        if data is None:
            return 0
        self.data[pid] = data
        self.held += len(data)
        token = self.token[pid] = next(self._tokens)
        return token

    def shrink(self, key: tuple) -> bool:
        """Whether the run of ``key`` gives its arena's memory back as it ends."""
        return self.enabled and not self.keep.get(key, False)

    def ran(self, key: tuple, touched: int) -> bytes | None:
        """A shrinking run of ``key`` touched ``touched`` bytes of new pages; the first of ``key`` decides whether
        its later runs keep their memory. Returns the plan's bytes when it is to be loaded again without an
        arena (its first run was too big to keep: the arena's first region would hold that memory for good)."""
        if touched > self.budget // 2 and self._trim is not None:
            self._trim(0)  # what the arena gave back to malloc goes back to the system too
        if key in self.keep:
            return None
        pid = key[0]
        have = self.kept.get(pid, 0)
        want = max(have, 2 * touched)
        fits = self.held - have + want <= self.budget
        self.keep[key] = fits
        if fits:
            self.kept[pid] = want
            self.held += want - have
        return None if fits else self.data.get(pid)

    def kept_run(self, key: tuple, touched: int) -> bytes | None:
        """A run of ``key`` that kept its arena's memory touched ``touched`` bytes of new pages. The arena grows
        back to what the plan's first runs took (their shrinking gave it back), which what it may keep allows
        for; past that, it grows beyond what they showed (an If that took a bigger branch): the growth counts
        as kept while the arenas fit the budget. Returns the plan's bytes when past the budget: it is to be
        loaded again without an arena now (its arena, with what the growth took, goes with its session)."""
        if touched < STRAY:
            return None
        pid = key[0]
        have = self.kept.get(pid, 0)
        grown = self.grown[pid] = self.grown.get(pid, 0) + touched
        if grown <= have:
            return None
        if self.held - have + 2 * grown <= self.budget:
            self.held += 2 * grown - have
            self.kept[pid] = 2 * grown
            return None
        return self.data.get(pid)

    def drop(self, pid: str) -> int:
        """Plan ``pid``'s session is gone (or new): what its arena kept is free. Returns its token (0: it had
        no arena), whose held outputs must be copied out of the arena (worker/devstore.py ``evacuate``)."""
        self.held -= self.kept.pop(pid, 0) + len(self.data.pop(pid, b""))
        self.grown.pop(pid, None)
        for key in [k for k in self.keep if k[0] == pid]:
            del self.keep[key]
        return self.token.pop(pid, 0)
