"""torch.distributed.rpc baseline processes (TensorPipe, tcp init on 127.0.0.1).

``python -m bench.rpcpeer --port P --rank 1 [--transport uv]`` is the callee; it serves until rank 0
shuts the group down. With ``--rank 0 --tiny RUNS`` this process is the caller instead: it times RUNS
``rpc_sync`` calls of the tiny function and prints the seconds as one JSON line (used to measure
TensorPipe's default shared-memory transport in isolation, because it busy-polls a core while idle).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings


def options(port: int, transport: str):  # noqa: ANN201 - torch type
    import torch.distributed.rpc as rpc

    kw = {} if transport == "default" else {"_transports": [transport]}
    return rpc.TensorPipeRpcBackendOptions(
        init_method=f"tcp://127.0.0.1:{port}", num_worker_threads=4, rpc_timeout=120, **kw
    )


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--transport", default="uv", help="uv (tcp), shm, or default (TensorPipe's choice)")
    ap.add_argument("--tiny", type=int, default=0, help="rank 0: time this many tiny rpc_sync calls")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import torch
    import torch.distributed.rpc as rpc

    torch.set_num_threads(1)
    name = "caller" if args.rank == 0 else "peer"
    rpc.init_rpc(name, rank=args.rank, world_size=2, rpc_backend_options=options(args.port, args.transport))
    if args.rank == 0 and args.tiny:
        from bench import rpcfns

        x = torch.randn(16)
        for _ in range(50):
            rpc.rpc_sync("peer", rpcfns.tiny, args=(x,))
        out = []
        for _ in range(args.tiny):
            t0 = time.perf_counter()
            rpc.rpc_sync("peer", rpcfns.tiny, args=(x,))
            out.append(time.perf_counter() - t0)
        print(json.dumps(out), flush=True)
    rpc.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
