"""The sandboxed runner: the only process of a plan-worker that creates onnxruntime sessions and runs plans.

Started by the supervisor (worker/sandbox.py) with one end of a socket pair; it bounds itself (data
memory, no core dumps, first in line for the OOM killer, dies with its parent) and then answers
Load/Run requests in the order they come, each as soon as it is done (worker/pipe.py). A plan that
crashes, exhausts memory or never ends costs this process only: the supervisor keeps the tensors and
plans and starts a fresh runner.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import select
import signal
import socket
import sys
import time

import numpy as np

from planwire.transport import codec, dtypes
from planwire.transport.errors import ProtocolError
from planwire.transport.graph import Graph, read_graph
from planwire.worker import pipe
from planwire.worker.device import Device

# After answering, the runner watches its pipe this long before sleeping on it, but only while requests
# have been coming within this long of its answers (a client's steady stream of calls) and spinning pays
# (pipe.Spin: it catches them, on a core to spare): the next one then costs no wake-up. At most this much
# of one core per answer, and nothing while requests come slower.
SPIN_S = 100e-6
# onnxruntime's CPU arena keeps the memory a run freed for the plan's next run. Without it every run maps and
# faults in its intermediates afresh: a ResNet-8 training step faulted in ~35 MB of new pages (~8,500 minor
# faults), a third of its CPU time. A plan's first run with given argument shapes gives its arena's memory back
# as it ends and shows how much it took (the new pages it touched); its later runs keep it while the arenas
# kept together may hold at most this much (twice what their runs touched: the arena grows by doubling);
# any other run gives it back as it ends, so a big run's memory does not stay with the runner. onnxruntime
# never gives back an arena's first region: a plan whose first run is too big to keep gets a session without
# an arena (as every plan had before, paying the faults). A later run that still faults in new pages (a plan
# the rule admitted by mistake: a defence, as plans with an If get no arena) has that growth counted too, or,
# past the budget, makes every run of its plan give its memory back. What the arenas keep counts as held by
# the runner for its data bound (another plan's run cannot use it).
KEEP_MB = 256
STRAY = 1 << 20  # new pages a run that keeps its arena may fault in unnoticed (the runner's own allocations)


def _data_bytes() -> int:
    """This process's data segment now (VmData: private writable memory, what RLIMIT_DATA counts)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def bound(memory_mb: int) -> int:
    """Bound this process; returns the RLIMIT_DATA set (0: none). Best effort where not permitted."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C reaches the whole group: the supervisor decides
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a SIGFPE must not write a core file
    with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")  # past RAM, the kernel kills this process, not the supervisor holding the data
    with contextlib.suppress(Exception):  # Linux: die with the supervisor, even mid-run
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(0)
    if memory_mb <= 0:
        return 0
    limit = _data_bytes() + (memory_mb << 20)  # what a load or run may add to the runner as started
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    except (OSError, ValueError):
        return 0
    return limit


def rebound(limit: int, held: int) -> None:
    """The data bound as the runner holds ``held`` bytes of tensors in its own memory: a run or load may
    add ``--max-run-memory-mb`` over what the runner holds (stored tensors are bounded by the store's
    quotas), as it may over what it used at start."""
    if limit <= 0:
        return
    with contextlib.suppress(OSError, ValueError):
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        want = limit + held
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (want, hard))


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
    loop or local function, and every op of :data:`SIZED_BY_DATA` takes its sizes (every input but the data,
    all of ConstantOfShape's and Range's) from values computed from ``Shape`` outputs and constants only, as an
    exported training step's gradients do (``Expand(g, Shape(x))``), never from an argument's values.

    No subgraph either, ``If`` included: which branch runs depends on the data, so the first runs of given
    shapes need not show what a later one takes (a hostile plan whose bigger branch runs once left ~160 MB
    held in the runner, uncounted, even after its session was loaded again without an arena)."""
    try:
        g = read_graph(data)
    except ValueError:
        return False
    return not g.functions and _follows(g)


def _follows(g: Graph) -> bool:
    """:func:`sizes_follow_shapes` for a graph read from a plan."""
    derived = set(g.initializers)  # values fixed by the plan or by the arguments' shapes
    for n in g.nodes:
        if n.domain or n.subgraphs:
            return False
        ins = [i for i in n.inputs if i]
        if n.op in SIZED_BY_DATA:
            sizes = ins if n.op in _ALL_SIZES else ins[1:]
            if not all(i in derived for i in sizes):
                return False
        if n.op in ("Shape", "Size", "Constant") or (ins and all(i in derived for i in ins)):
            derived.update(o for o in n.outputs if o)
    return True


class Arenas:
    """Which runs keep their plan's onnxruntime CPU arena memory, by (plan, argument shapes), and how much the
    kept arenas may hold (``held``, bytes). ``enabled``: sessions have an arena (CPU runners)."""

    def __init__(self, budget: int, *, enabled: bool) -> None:
        self.budget, self.enabled = budget, enabled
        self.kept: dict[str, int] = {}  # plan -> bytes its arena may keep
        self.keep: dict[tuple, bool] = {}  # (plan, shapes) -> its runs keep their memory
        self.held = 0
        self.grown: dict[str, int] = {}  # plan -> bytes of new pages its keeping runs faulted in so far
        self.first: dict[str, bytes] = {}  # plan -> its bytes until its first run (to load it without arena)
        self._trim = None
        with contextlib.suppress(Exception):  # glibc: free memory back to the system now (else kept at will)
            import ctypes

            self._trim = ctypes.CDLL(None).malloc_trim

    def arena(self, data: bytes) -> bool:
        """Whether a plan of these bytes gets a session with an arena (its bytes are kept until its first run,
        so not for big plans: their weights, not their runs, are their memory), and only when its runs' memory
        follows from the argument shapes (:func:`sizes_follow_shapes`): the first run of given shapes then
        shows what every later one takes."""
        return self.enabled and len(data) <= self.budget // 4 and sizes_follow_shapes(data)

    def loaded(self, pid: str, data: bytes | None) -> None:
        """Plan ``pid`` has a new session, with an arena when ``data`` (its bytes) is given."""
        self.drop(pid)
        if data is not None:
            self.first[pid] = data

    def shrink(self, key: tuple) -> bool:
        """Whether the run of ``key`` gives its arena's memory back as it ends."""
        return self.enabled and not self.keep.get(key, False)

    def ran(self, key: tuple, touched: int) -> bytes | None:
        """A shrinking run of ``key`` touched ``touched`` bytes of new pages; the first of ``key`` decides whether
        its later runs keep their memory. Returns the plan's bytes when it is to be loaded again without an
        arena (its first run was too big to keep: the arena's first region would hold that memory for good)."""
        if touched > self.budget // 2 and self._trim is not None:
            self._trim(0)  # what the arena gave back to malloc goes back to the system too
        pid = key[0]
        data = self.first.pop(pid, None)
        if key in self.keep:
            return None
        have = self.kept.get(pid, 0)
        want = max(have, 2 * touched)
        fits = self.held - have + want <= self.budget
        self.keep[key] = fits
        if fits:
            self.kept[pid] = want
            self.held += want - have
        return None if fits else data

    def kept_run(self, key: tuple, touched: int) -> None:
        """A run of ``key`` that kept its arena's memory touched ``touched`` bytes of new pages. The arena
        grows back to what the plan's first runs took (their shrinking gave it back), which what it may keep
        allows for; past that, it grows beyond what they showed (a plan the rule admitted by mistake):
        the growth counts as kept while the arenas fit the budget, and past the budget every run of the plan
        gives its memory back from now on (the next one returns what the growth took)."""
        if touched < STRAY:
            return
        pid = key[0]
        have = self.kept.get(pid, 0)
        grown = self.grown[pid] = self.grown.get(pid, 0) + touched
        if grown <= have:
            return
        if self.held - have + 2 * grown <= self.budget:
            self.held += 2 * grown - have
            self.kept[pid] = 2 * grown
            return
        for k in self.keep:
            if k[0] == pid:
                self.keep[k] = False

    def drop(self, pid: str) -> None:
        """Plan ``pid``'s session is gone (or new): what its arena kept is free."""
        self.held -= self.kept.pop(pid, 0)
        self.first.pop(pid, None)
        self.grown.pop(pid, None)
        for key in [k for k in self.keep if k[0] == pid]:
            del self.keep[key]


def _touched() -> int:
    """Bytes of new pages this process has faulted in so far (minor faults × page size)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt * resource.getpagesize()


def serve(sock: socket.socket, directory: str, device: Device, threads: int, limit: int = 0) -> None:
    """Answer requests until the supervisor closes the pipe (``limit``: the data bound set at start)."""
    from planwire.worker.devstore import DeviceStore, value_info
    from planwire.worker.runtime import OrtPlan, is_out_of_memory

    sessions: dict[str, OrtPlan] = {}
    store = DeviceStore(device)
    shapes: dict[tuple, list | None] = {}  # (plan, argument shapes) -> its outputs' (type, shape); None: varies
    prefix = f"o{os.getpid()}-"
    arenas = Arenas(KEEP_MB << 20, enabled=not device.cuda)

    def load(pid: str, name: str, data: memoryview | bytes, *, arena: bool = True) -> OrtPlan:
        data = bytes(data)
        arena = arena and arenas.arena(data)
        plan = OrtPlan(data, name=name, device=device, threads=threads, arena=arena)
        sessions[pid] = plan
        arenas.loaded(pid, data if arena else None)
        for key in [k for k in shapes if k[0] == pid]:
            del shapes[key]
        return plan

    def arg(i: int, ref: pipe.TensorRef, buffers: list[memoryview]) -> object:
        if not ref.has_data:
            try:
                return store.get(ref.handle)
            except KeyError:
                raise ProtocolError("internal", f"runner holds no tensor #{ref.handle} (argument {i})") from None
        if ref.segment:
            seg = pipe.open_segment(directory, ref.segment, unlink=False)
            array = pipe.array_in(seg, ref.dtype, ref.shape, ref.offset)
        else:
            array = codec.from_frame(ref.dtype, ref.shape, buffers[ref.index], what=f"argument {i}")
        value, keep = store.upload(array)
        if ref.handle:
            store.hold(ref.handle, value, keep)
            return value
        return value if keep is None else (value, keep)  # the wrapped array lives as long as this run

    def out_ref(
        value: object, data: bool, frames: list, info: tuple[str, list[int], int] | None = None
    ) -> tuple[pipe.TensorRef, np.ndarray | None]:
        """The reference to an output or held tensor (``info``: its ``value_info``, when read already), with its
        data when ``data``: in ``frames`` when small, else in a new shared-memory segment (its view returned too)."""
        wire, shape, nbytes = value_info(value) if info is None else info
        if not data:
            return pipe.TensorRef(wire, shape), None
        if nbytes <= pipe.INLINE_MAX:
            frames.append(codec.to_frame(store.download(value))[2])
            return pipe.TensorRef(wire, shape, index=len(frames) - 1), None
        seg = pipe.create_segment(directory, prefix, nbytes, unlink=False)
        view = np.frombuffer(seg, dtypes.to_numpy(wire), count=math.prod(shape)).reshape(shape)
        store.download(value, view)
        return pipe.TensorRef(wire, shape, segment=os.path.basename(seg.path)), view

    reader = pipe.requests(sock)
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    clock, fast, spin = time.perf_counter, False, pipe.Spin()
    bound_at = 0  # what the data bound allows for now (bound() set it for nothing held)
    while True:
        idle = clock()
        if fast and not reader.pending() and spin.allowed():
            spin.until(lambda: poller.poll(0), idle + SPIN_S)
        try:
            msg, buffers = reader.read()
        except pipe.PipeClosed:
            return
        fast = clock() - idle < SPIN_S
        store.free(msg.free)
        for pid in getattr(msg, "drop", ()):  # unregistered plans (delete_plan)
            sessions.pop(pid, None)
            arenas.drop(pid)
        held = store.private_bytes + arenas.held
        if held != bound_at:  # (a training step holds what the one before held: no system calls)
            rebound(limit, held)
            bound_at = held
        try:
            if isinstance(msg, pipe.Load):
                plan = load(msg.plan, msg.name, buffers[0])
                loaded = pipe.Loaded(inputs=plan.inputs, outputs=plan.outputs, placement=plan.placement)  # type: ignore[arg-type]
                pipe.send(sock, loaded)
                continue
            if isinstance(msg, pipe.Fetch):
                refs, frames = [], []
                for h in msg.handles:
                    try:
                        value = store.get(h)
                    except KeyError:
                        raise ProtocolError("internal", f"runner holds no tensor #{h} to fetch") from None
                    ref, view = out_ref(value, True, frames)
                    if view is not None and msg.rebind and not device.cuda:
                        store.hold(h, *store.wrap(view))  # held by the shared copy: the runner's own goes
                    refs.append(ref)
                    del view
                pipe.send(sock, pipe.Fetched(tensors=refs), frames)
                continue
            plan = load(msg.plan, msg.name, buffers[0]) if msg.load else sessions.get(msg.plan)  # type: ignore[assignment]
            if plan is None:
                raise ProtocolError("internal", f"runner has no session for plan {msg.name!r}")
            values, keep = [], []
            for i, ref in enumerate(msg.args):
                v = arg(i, ref, buffers)
                if isinstance(v, tuple):
                    v, k = v
                    keep.append(k)
                values.append(v)
            key = (msg.plan, tuple(tuple(r.shape) for r in msg.args))
            known = shapes.get(key)
            reuse = store.buffers(known)
            shrink = plan.arena and arenas.shrink(key)
            touched = _touched()
            try:
                results = plan.run_bound(values, reuse, shrink=shrink)
            except Exception:
                if reuse is None:
                    raise
                shapes[key] = None  # outputs' shapes depend on the data: no buffers bound from now on
                results = plan.run_bound(values, None, shrink=shrink)
            finally:
                store.release_pool()
            if plan.arena and not shrink:
                arenas.kept_run(key, _touched() - touched)
            elif shrink and (again := arenas.ran(key, _touched() - touched)) is not None:
                with contextlib.suppress(Exception):  # (outputs onnxruntime cannot copy: the arena stays)
                    results = [store.copy(r) for r in results]  # out of the arena, which goes with its session
                    plan = load(msg.plan, msg.name, again, arena=False)
            if key not in shapes:
                shapes[key] = [(r.data_type(), tuple(r.shape())) for r in results]
            wanted = set(range(len(results))) if msg.save else set(msg.fetch)
            rebind = msg.save and not device.cuda
            outs, frames = [], []
            # an output may share its memory with an input or another output (Identity, Reshape): such
            # memory is never handed to a later run to write into
            seen = {v.data_ptr() for v in values}
            for i, (h, value) in enumerate(zip(msg.out, results, strict=True)):
                ptr = value.data_ptr()
                info = value_info(value)  # read once per output: dtype, shape, bytes
                nbytes = info[2]
                store.hold(h, value, own=ptr not in seen and nbytes > 0, nbytes=nbytes)
                seen.add(ptr)
                small = bool(msg.inline_max) and nbytes <= msg.inline_max
                ref, view = out_ref(value, i in wanted or small, frames, info)
                if view is not None and rebind:
                    store.hold(h, *store.wrap(view))  # held by the shared copy: the runner's own goes
                outs.append(ref)
                del view
            del results, values, keep
            reused = 0 if reuse is None else sum(b is not None for b in reuse)
            pipe.send(sock, pipe.Ran(outputs=outs, reused=reused), frames)
        except ProtocolError as e:
            pipe.send(sock, pipe.Failed(e.code, e.message))
        except Exception as e:  # onnxruntime's own errors say what they are
            code = "out_of_memory" if is_out_of_memory(e) else "run_failed"
            cls = type(e).__name__
            text = str(e) if cls in ("Fail", "RuntimeException", "InvalidArgument") else f"{cls}: {e}"
            pipe.send(sock, pipe.Failed(code, text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="planwire-runner", description="internal: started by plan-worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-mem-limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-mb", type=int, default=0)
    args = ap.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    import onnxruntime  # noqa: F401  (loaded before the bound: the bound is what plans may add)

    from planwire.worker.device import Device, preload_cuda

    device = Device.parse(args.device, args.gpu_mem_limit)
    if device.cuda:  # the CUDA context and libraries load before the bound: it bounds what plans add
        preload_cuda()
        with contextlib.suppress(Exception):
            import numpy as np
            import onnxruntime as ort

            ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.float32), "cuda", device.id)
    limit = bound(args.memory_mb)
    pipe.send(sock, pipe.Ready(pid=os.getpid(), memory_limit=limit))
    serve(sock, args.dir, device, args.threads, limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
