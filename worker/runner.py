"""The sandboxed runner: the only process of a plan-worker that creates onnxruntime sessions and runs plans.

Started by the supervisor (worker/sandbox.py) with one end of a socket pair; it bounds itself (data
memory, no core dumps, first in line for the OOM killer, dies with its parent) and then answers
Load/Run requests one at a time (worker/pipe.py). A plan that crashes, exhausts memory or never ends
costs this process only: the supervisor keeps the tensors and plans and starts a fresh runner.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import signal
import socket
import sys

from planwire.transport import codec
from planwire.transport.errors import ProtocolError
from planwire.worker import pipe


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


def serve(sock: socket.socket, directory: str, providers: list[str], threads: int) -> None:
    """Answer requests until the supervisor closes the pipe."""
    from planwire.worker.runtime import OrtPlan, is_out_of_memory

    sessions: dict[str, OrtPlan] = {}
    prefix = f"o{os.getpid()}-"

    def load(pid: str, name: str, data: memoryview) -> OrtPlan:
        # No memory arena: what a run allocates goes back when it ends, rather than staying with the runner.
        plan = OrtPlan(bytes(data), name=name, providers=providers, threads=threads, arena=False)
        sessions[pid] = plan
        return plan

    while True:
        try:
            msg, buffers = pipe.recv_request(sock)
        except pipe.PipeClosed:
            return
        for pid in msg.drop:  # unregistered plans (delete_plan)
            sessions.pop(pid, None)
        try:
            if isinstance(msg, pipe.Load):
                plan = load(msg.plan, msg.name, buffers[0])
                pipe.send(sock, pipe.Loaded(inputs=plan.inputs, outputs=plan.outputs))  # type: ignore[arg-type]
                continue
            plan = load(msg.plan, msg.name, buffers[0]) if msg.load else sessions.get(msg.plan)  # type: ignore[assignment]
            if plan is None:
                raise ProtocolError("internal", f"runner has no session for plan {msg.name!r}")
            args = []
            for i, ref in enumerate(msg.args):
                if ref.segment:
                    seg = pipe.open_segment(directory, ref.segment, unlink=False)
                    args.append(pipe.array_in(seg, ref.dtype, ref.shape, ref.offset))
                else:
                    args.append(codec.from_frame(ref.dtype, ref.shape, buffers[ref.index], what=f"argument {i}"))
            results = plan.run(args, check=False)
            del args
            outs, frames = [], []
            for r in results:
                wire, shape, buf = codec.to_frame(r)
                if buf.nbytes <= pipe.INLINE_MAX:
                    outs.append(pipe.TensorRef(wire, shape, index=len(frames)))
                    frames.append(buf)
                else:
                    copy = pipe.to_segment(directory, prefix, r, unlink=False)
                    seg = pipe.segment_of(copy)
                    outs.append(pipe.TensorRef(wire, shape, segment=os.path.basename(seg[0].path)))  # type: ignore[index]
                    del copy, seg
            del results
            pipe.send(sock, pipe.Ran(outputs=outs), frames)
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
    ap.add_argument("--providers", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--memory-mb", type=int, default=0)
    args = ap.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    import onnxruntime  # noqa: F401  (loaded before the bound: the bound is what plans may add)

    import planwire.worker.runtime  # noqa: F401

    limit = bound(args.memory_mb)
    pipe.send(sock, pipe.Ready(pid=os.getpid(), memory_limit=limit))
    serve(sock, args.dir, args.providers.split(","), args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
