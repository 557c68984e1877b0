"""Where plans run: the ``Device`` a worker is given (``cpu``, ``cuda``, ``cuda:N``; ``--gpu-mem-limit`` caps
the CUDA arena) and whether it is usable here, probed in a child process (``check_device``) so that a
broken CUDA install costs one line at start, never the worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import onnxruntime as ort

from planwire.transport.ortoptions import session_options

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# y = Identity(x), float32[1]: the smallest model, to load the CUDA provider and touch the device.
_PROBE = (
    b'\x08\x07\x12\x00:;\n\x10\n\x01x\x12\x01y"\x08Identity\x12\x05probeZ\x0f\n\x01x\x12\n\n\x08\x08\x01\x12\x04\n'
    b"\x02\x08\x01b\x0f\n\x01y\x12\n\n\x08\x08\x01\x12\x04\n\x02\x08\x01B\x04\n\x00\x10\r"
)


@dataclass(frozen=True)
class Device:
    """Where a worker runs plans: ``kind`` cpu or cuda, CUDA device ``id``, and its arena cap in MiB (0: none)."""

    kind: str = "cpu"
    id: int = 0
    mem_limit_mb: int = 0

    @classmethod
    def parse(cls, spec: str, gpu_mem_limit_mb: int = 0) -> Device:
        """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when onnxruntime has the provider); ValueError for
        anything else, RuntimeError (one line, naming what to do) for cuda without a CUDA provider."""
        kind, _, index = spec.partition(":")
        if kind == "auto" and not index:
            kind = "cuda" if CUDA in ort.get_available_providers() else "cpu"
        if kind not in ("cpu", "cuda") or (index and (kind != "cuda" or not index.isdigit())):
            raise ValueError(f"unknown device {spec!r}: use cpu, cuda, cuda:N or auto")
        if gpu_mem_limit_mb < 0:
            raise ValueError("--gpu-mem-limit must be 0 (no cap) or a positive number of MiB")
        if kind == "cuda" and CUDA not in ort.get_available_providers():
            available = ", ".join(ort.get_available_providers())
            raise RuntimeError(
                f"--device {spec}: onnxruntime has no CUDA provider here (package {_package()}, available: "
                f"{available}); install planwire[cuda] (onnxruntime-gpu, see the README's CUDA section), or use "
                "--device cpu"
            )
        return cls(kind, int(index or 0), gpu_mem_limit_mb if kind == "cuda" else 0)

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.id}"

    @property
    def cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def providers(self) -> list[str]:
        """Provider names, in order (what welcome reports)."""
        return [CUDA, CPU] if self.cuda else [CPU]

    def session_providers(self, *, cpu_fallback: bool = True) -> list:
        """``providers`` for ``InferenceSession``, with the CUDA options (device id, arena cap)."""
        if not self.cuda:
            return [CPU]
        options = {"device_id": str(self.id), "arena_extend_strategy": "kSameAsRequested"}
        if self.mem_limit_mb:
            options["gpu_mem_limit"] = str(self.mem_limit_mb << 20)
        return [(CUDA, options), CPU] if cpu_fallback else [(CUDA, options)]

    @property
    def ort_name(self) -> str:
        """The device name onnxruntime's OrtValue and IOBinding APIs take."""
        return "cuda" if self.cuda else "cpu"


def _package() -> str:
    for name in ("onnxruntime-gpu", "onnxruntime"):
        with contextlib.suppress(Exception):
            from importlib import metadata

            return f"{name} {metadata.version(name)}"
    return f"onnxruntime {ort.__version__}"


# -- checking a CUDA device ------------------------------------------------------------------------


def cuda_devices() -> list[tuple[str, int]]:
    """(name, total memory in bytes) of each CUDA device the driver shows this process (it honours
    CUDA_VISIBLE_DEVICES); RuntimeError naming why there are none (no driver, no device)."""
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"no NVIDIA driver on this machine (libcuda.so.1: {e})") from None
    rc = cu.cuInit(0)
    if rc:
        raise RuntimeError(f"the NVIDIA driver found no usable CUDA device (cuInit: {_cu_error(cu, rc)})")
    count = ctypes.c_int()
    rc = cu.cuDeviceGetCount(ctypes.byref(count))
    if rc:
        raise RuntimeError(f"cuDeviceGetCount failed: {_cu_error(cu, rc)}")
    out = []
    for i in range(count.value):
        dev = ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        total = ctypes.c_size_t()
        if cu.cuDeviceGet(ctypes.byref(dev), i) or cu.cuDeviceGetName(name, 256, dev):
            out.append((f"CUDA device {i}", 0))
            continue
        cu.cuDeviceTotalMem_v2(ctypes.byref(total), dev)
        out.append((name.value.decode(errors="replace"), total.value))
    return out


def _cu_error(cu: ctypes.CDLL, rc: int) -> str:
    text = ctypes.c_char_p()
    with contextlib.suppress(Exception):
        if cu.cuGetErrorName(rc, ctypes.byref(text)) == 0 and text.value:
            return f"{text.value.decode()} ({rc})"
    return f"error {rc}"


def preload_cuda() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) when they are installed;
    system libraries are found by the loader as usual. Its notes go to stderr."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        with contextlib.suppress(Exception), contextlib.redirect_stdout(sys.stderr):
            preload()


def probe(device: Device) -> dict:
    """Check, in this process, that plans can run on ``device``: the provider, the device's name and memory.
    RuntimeError with one line naming the reason (no provider, no driver, no device N, libraries missing)."""
    if not device.cuda:
        return {"device": "cpu", "provider": CPU, "name": _cpu_name(), **_host(), "onnxruntime": _package()}
    Device.parse(str(device))  # the provider is there
    found = cuda_devices()
    if device.id >= len(found):
        raise RuntimeError(f"--device {device}: no CUDA device {device.id} here ({len(found)} visible)")
    preload_cuda()
    try:
        session = ort.InferenceSession(_PROBE, session_options(1), providers=device.session_providers())
    except Exception as e:
        raise RuntimeError(f"--device {device}: onnxruntime's CUDA provider failed to start: {_one_line(e)}") from None
    if CUDA not in session.get_providers():
        raise RuntimeError(f"--device {device}: onnxruntime's CUDA provider did not load ({_provider_load_error()})")
    name, total = found[device.id]
    return {
        "device": str(device),
        "provider": CUDA,
        "name": name,
        "memory_bytes": total,
        "gpu_mem_limit_bytes": device.mem_limit_mb << 20,
        "onnxruntime": _package(),
    }


def check_device(device: Device) -> dict:
    """``probe`` in a short-lived child process, so that this process (the supervisor, holding the data)
    never creates a CUDA context of its own; the same RuntimeError. CPU needs no child."""
    if not device.cuda:
        return probe(device)
    Device.parse(str(device))  # no CUDA provider at all: said here, no child needed
    code = "import sys; from planwire.worker.device import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, str(device), str(device.mem_limit_mb)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"--device {device}: checking the CUDA device took over 120 s") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        return json.loads(lines[-1])
    why = lines[-1] if lines else _one_line(done.stderr.strip().splitlines()[-1:] or "the check crashed")
    raise RuntimeError(why)


def _provider_load_error() -> str:
    path = os.path.join(os.path.dirname(ort.__file__), "capi", "libonnxruntime_providers_cuda.so")
    try:
        ctypes.CDLL(path)
    except OSError as e:
        return f"missing libraries: {e}; install CUDA 12 and cuDNN 9, e.g. pip install planwire[cuda]"
    return "see the worker's log for onnxruntime's message"


def _host() -> dict:
    memory = 0
    with contextlib.suppress(OSError, ValueError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"memory_bytes": memory, "cores": os.cpu_count() or 0}


def _cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "CPU"


def _one_line(e: object) -> str:
    return " ".join(str(e).split())[:500]


def describe(found: dict) -> str:
    """A probe's result in words: ``NAME, N MiB[, N cores][ (arena capped at N MiB)]``."""
    words = f"{found['name']}, {found['memory_bytes'] >> 20} MiB"
    if found.get("cores"):
        words += f", {found['cores']} cores"
    if found.get("gpu_mem_limit_bytes"):
        words += f" (arena capped at {found['gpu_mem_limit_bytes'] >> 20} MiB)"
    return words


def main(argv: list[str] | None = None) -> int:
    """``main([DEVICE, GPU_MEM_LIMIT_MB])``: ``probe`` in a child process
    (check_device): the result as one JSON line, or the reason as one line and status 1."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        found = probe(Device.parse(argv[0], int(argv[1]) if len(argv) > 1 else 0))
    except (RuntimeError, ValueError) as e:
        print(_one_line(e))
        return 1
    print(json.dumps(found))
    return 0
