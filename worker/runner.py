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
from planwire.worker import pipe
from planwire.worker.arenas import KEEP_MB, STRAY, Arenas, touched
from planwire.worker.device import Device

# After answering, the runner watches its pipe this long before sleeping on it, but only while requests
# have been coming within this long of its answers (a client's steady stream of calls) and spinning pays
# (pipe.Spin: it catches them, on a core to spare): the next one then costs no wake-up. At most this much
# of one core per answer, and nothing while requests come slower.
SPIN_S = 100e-6


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


SLACK = 1 << 20  # bytes: the data bound follows what the runner holds in steps of this much


class DataBound:
    """The data bound as the runner holds ``held`` bytes of tensors in its own memory: a run or load may add
    ``--max-run-memory-mb`` over what the runner holds (stored tensors are bounded by the store's quotas), as it
    may over what it used at start (``limit``: the bound ``bound()`` set for nothing held; 0: none). What it
    holds counts rounded up to :data:`SLACK` (a run may take less than that more), and the bound is set only
    when that figure changes: each step's loss, held until the client's frees come in a batch, grew what the
    runner holds by a few bytes per training step, and cost two system calls every step."""

    def __init__(self, limit: int) -> None:
        self.limit, self.at = limit, 0
        self.hard = resource.RLIM_INFINITY
        with contextlib.suppress(OSError, ValueError):
            self.hard = resource.getrlimit(resource.RLIMIT_DATA)[1]  # only this process could lower it

    def hold(self, held: int) -> None:
        want = -(-held // SLACK) * SLACK
        if want == self.at or self.limit <= 0:
            return
        self.at = want
        bound = self.limit + want
        if self.hard != resource.RLIM_INFINITY:
            bound = min(bound, self.hard)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_DATA, (bound, self.hard))


def serve(
    sock: socket.socket, directory: str, device: Device, threads: int, limit: int = 0, *, nchwc: bool = True
) -> None:
    """Answer requests until the supervisor closes the pipe (``limit``: the data bound set at start; ``nchwc``:
    plans' eligible Convs as onnxruntime's NCHWc kernels, worker/nchwc.py)."""
    from planwire.worker.devstore import DeviceStore, described, value_info
    from planwire.worker.runtime import OrtPlan, is_out_of_memory

    sessions: dict[str, OrtPlan] = {}
    store = DeviceStore(device)
    shapes: dict[tuple, list | None] = {}  # (plan, argument shapes) -> its outputs' (type, shape); None: varies
    prefix = f"o{os.getpid()}-"
    arenas = Arenas(KEEP_MB << 20, enabled=not device.cuda)

    def load(pid: str, name: str, data: memoryview | bytes, *, arena: bool = True) -> OrtPlan:
        data = bytes(data)
        arena = arena and arenas.arena(data)
        plan = OrtPlan(data, name=name, device=device, threads=threads, arena=arena, nchwc=nchwc)
        store.evacuate(arenas.drop(pid))  # the session it replaces goes: what it made leaves its arena
        sessions[pid] = plan
        arenas.loaded(pid, data if arena else None)
        for key in [k for k in shapes if k[0] == pid]:
            del shapes[key]
        return plan

    def arg(i: int, ref: pipe.TensorRef, buffers: list[memoryview]) -> object:
        """An argument sent with its data (a held one goes by handle: the run's loop takes it)."""
        if not ref.has_data:
            raise ProtocolError("internal", f"argument {i} has neither data nor a handle")
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
    data_bound = DataBound(limit)
    last: tuple[str, list] = ("", [])  # (plan, its outputs' kinds) of the last Ran sent (pipe.SAME)
    renew: tuple[str, str, bytes] | None = None  # (plan, name, bytes) of a failed run that grew its arena
    while True:
        # no reference to a request's values, outputs or session outlives it: an OrtValue of a session's arena
        # (a small output's inline frame too) keeps that whole arena alive, all it grew to, after its session goes
        plan = value = values = keep = reuse = results = frames = outs = refs = ref = got = None  # type: ignore[assignment]
        if renew is not None:  # a failed run grew its session's arena, uncounted: the session gets a new arena
            with contextlib.suppress(ProtocolError):  # (it cannot be loaded again: it keeps its arena)
                load(*renew)  # the old session goes, its held outputs copied out of its arena first
            renew = None
        idle = clock()
        if fast and not reader.pending() and spin.allowed():
            spin.until(lambda: poller.poll(0), idle + SPIN_S)
        try:
            msg, buffers = reader.read()
        except pipe.PipeClosed:
            return
        fast = clock() - idle < SPIN_S
        store.free(msg.free)
        for pid in getattr(msg, "drop", ()):  # unregistered plans (delete_plan, idle unload)
            sessions.pop(pid, None)
            store.evacuate(arenas.drop(pid))
        data_bound.hold(store.private_bytes + arenas.held)
        try:
            if isinstance(msg, pipe.Load):
                plan = load(msg.plan, msg.name, buffers[0])
                loaded = pipe.Loaded(plan.inputs, plan.outputs, plan.placement, plan.nchwc)  # type: ignore[arg-type]
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
            # an output may share its memory with an input or another output (Identity, Reshape): such
            # memory is never handed to a later run to write into (held inputs: their address read when held)
            seen = set()
            holding = store.held
            dims = []  # the arguments' shapes: with the plan, what its outputs' shapes depend on
            for i, ref in enumerate(msg.args):
                if type(ref) is int:  # held already (a step's state): by handle
                    got = holding.get(ref)
                    if got is None:
                        raise ProtocolError("internal", f"runner holds no tensor #{ref} (argument {i})")
                    values.append(got.value)
                    seen.add(got.ptr)
                    kind = got.kind
                    if kind is None:  # read once per held value
                        kind = got.kind = (got.value.data_type(), tuple(got.value.shape()))  # type: ignore[attr-defined]
                    dims.append(kind[1])
                    continue
                v = arg(i, ref, buffers)  # type: ignore[arg-type]
                if isinstance(v, tuple):
                    v, k = v
                    keep.append(k)
                values.append(v)
                seen.add(v.data_ptr())  # type: ignore[attr-defined]
                dims.append(tuple(ref.shape))  # type: ignore[union-attr]
            key = (msg.plan, tuple(dims))
            known = shapes.get(key)
            reuse = store.buffers(known)
            shrink = plan.arena and arenas.shrink(key)
            token = arenas.token.get(msg.plan, 0) if plan.arena else 0
            before = touched() if plan.arena else 0  # two getrusage calls per run only where an arena is watched
            try:
                try:
                    results = plan.run_bound(values, reuse, shrink=shrink, addresses=store.addresses or ())
                except Exception:
                    if reuse is None:
                        raise
                    shapes[key] = None  # outputs' shapes depend on the data: no buffers bound from now on
                    results = plan.run_bound(values, None, shrink=shrink)
                finally:
                    store.release_pool()
            except Exception:
                if plan.arena and touched() - before >= STRAY:  # what it took stays in its arena, uncounted
                    data = arenas.data.get(msg.plan)
                    renew = None if data is None else (msg.plan, msg.name, data)
                raise
            again = None  # the plan's bytes, when it is to be loaded again without an arena
            if plan.arena:
                grew = touched() - before
                again = arenas.ran(key, grew) if shrink else arenas.kept_run(key, grew)
            wanted = set(range(len(results))) if msg.save else set(msg.fetch)
            rebind = msg.save and not device.cuda
            outs, frames = [], []
            infos, kinds = [], []
            lent, given = store.lent, reuse or ()
            for i, (h, value) in enumerate(zip(msg.out, results, strict=True)):
                # read once per output: its (ONNX type, shape), the pool its buffer joins when freed, and the
                # reply's dtype, shape and bytes (a copy out of the arena too); an output written into the
                # buffer it was given is that buffer (OrtPlan.run_bound), of the kind it was lent for
                if given and value is given[i]:
                    ptr, kind = store.addresses[i], known[i]  # type: ignore[index]
                else:
                    ptr, kind = value.data_ptr(), (value.data_type(), tuple(value.shape()))
                info = described(*kind)
                kinds.append(kind)
                infos.append(info)
                own = ptr not in seen and info[2] > 0
                store.hold(h, value, own=own, arena=lent.get(ptr, token), nbytes=info[2], ptr=ptr, kind=kind)
                seen.add(ptr)
            if key not in shapes:
                shapes[key] = kinds
            if again is not None:
                with contextlib.suppress(ProtocolError):  # (it cannot be loaded again: it keeps its arena)
                    plan = load(msg.plan, msg.name, again, arena=False)  # its outputs, this run's too, leave the arena
                results = [store.get(h) for h in msg.out]
            before = last[1] if last[0] == msg.plan and len(last[1]) == len(kinds) else None
            for i, (h, value, info) in enumerate(zip(msg.out, results, infos, strict=True)):
                data = i in wanted or bool(msg.inline_max) and info[2] <= msg.inline_max
                if not data and before is not None and before[i] == kinds[i]:
                    outs.append(pipe.SAME)
                    continue
                ref, view = out_ref(value, data, frames, info)
                if view is not None and rebind:  # held by the shared copy: the runner's own goes
                    store.hold(h, *store.wrap(view), kind=kinds[i])
                outs.append(ref)
                del view
            reused = store.lending
            del results, values, keep, reuse
            pipe.send(sock, pipe.Ran(outputs=outs, reused=reused), frames)
            last = (msg.plan, kinds)  # sent: the supervisor reads every Ran, in order, and keeps the same
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
    ap.add_argument("--no-nchwc", dest="nchwc", action="store_false")
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
    serve(sock, args.dir, device, args.threads, limit, nchwc=args.nchwc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
