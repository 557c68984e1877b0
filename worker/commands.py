"""The plan-worker commands that serve nothing: ``check`` (where plans would run), ``keys`` (a CURVE key
pair) and ``status`` (a live worker, from its admin socket).
"""

from __future__ import annotations

import sys

from planwire.worker.device import describe
from planwire.worker.options import command


def check_main(argv: list[str]) -> int:
    """``plan-worker check [--device DEVICE]``: where plans would run, or one line saying why they cannot."""
    ap = command(
        "plan-worker check",
        "Check where this worker's plans would run: the onnxruntime provider, the device's name and "
        "memory. Exits 1 with one line naming the reason when the device is not usable.",
        "plan-worker check --device cuda",
        "plan-worker --device cuda:1 --check",
    )
    ap.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--gpu-mem-limit", type=int, default=0, metavar="MB", help="the arena cap to check with")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args, _ = ap.parse_known_args(argv)  # the other options of a serving command line are ignored
    from planwire.worker.device import Device, check_device

    try:
        found = check_device(Device.parse(args.device, args.gpu_mem_limit))
    except (RuntimeError, ValueError) as e:
        print(f"plan-worker check: {e}", file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps(found))
    else:
        print(f"provider     {found['provider']}")
        print(f"device       {found['device']}: {describe(found)}")
        print(f"onnxruntime  {found['onnxruntime']}")
    return 0


def keys_main(argv: list[str]) -> int:
    """``plan-worker keys DIR [--name NAME]``: a CURVE key pair with zmq.auth."""
    ap = command(
        "plan-worker keys",
        "Make a CURVE key pair: NAME.key (public: give it to peers) and NAME.key_secret (keep it).",
        "plan-worker keys keys --name worker",
        "plan-worker keys keys/clients --name alice",
    )
    ap.add_argument("dir", metavar="DIR", help="directory to write the keys into (created if missing)")
    ap.add_argument("--name", default="worker", help="file name of the pair")
    args = ap.parse_args(argv)
    from planwire.transport.auth import create_keys

    try:
        public, secret = create_keys(args.dir, args.name)
    except (OSError, ValueError) as e:
        print(f"plan-worker keys: {e}", file=sys.stderr)
        return 2
    print(f"public key {public}\nsecret key {secret} (mode 0600: keep it, never send it)")
    return 0


def status_main(argv: list[str]) -> int:
    """``plan-worker status ADDR``: what a live worker holds and did, from its admin socket."""
    ap = command(
        "plan-worker status",
        "Show a live worker: id, uptime, clients, their tensors and plans, runs, releases.",
        "plan-worker status ipc:///run/user/1000/planwire/worker-4242.admin",
    )
    ap.add_argument("addr", metavar="ADDR", help="the worker's admin socket (its log says 'admin on ADDR')")
    ap.add_argument("--json", action="store_true", help="print the status as JSON")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    args = ap.parse_args(argv)
    import msgspec

    from planwire.worker.admin import format_status, query

    try:
        st = query(args.addr, timeout=args.timeout)
    except ConnectionError as e:
        print(f"plan-worker status: {e}", file=sys.stderr)
        return 1
    print(msgspec.json.encode(st).decode() if args.json else format_status(st))
    return 0
