"""GPU: plan-worker ``--device cuda`` against eager CUDA torch on the same GPU (else against the CPU
worker, with no target), skipped with the reason where no CUDA device can run plans.

* tiny call: ``ptr(x).get()`` of bench/plans.py's tiny plan, on the CUDA worker and on the CPU worker;
* 64 MiB: put + get (the store: host memory either way), and put + run (x * 2 + 1) + get, where the data
  crosses host -> device -> host on the CUDA worker;
* training steps of bench/workloads.py's ResNet-style CNN and transformer LM, synchronous (run + get loss)
  and pipelined, target <= 1.0x eager CUDA torch per step; the worker's ``device_copies`` over the steps
  (no upload or download of state after the first step: counted, target 0);
* onnxruntime's profiler on each step run as the runner runs it (IOBinding on OrtValues on the device,
  state advanced on the device): Memcpy nodes on the step's path, counted, target 0; the plan's placement
  (nodes on CPU) is reported beside.

``bench/gpu_machine.sh`` runs this family and the GPU tests on a machine with an NVIDIA GPU.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tempfile
import warnings
from typing import Any

import numpy as np

from bench import plans
from bench.env import Env
from bench.timing import Case, Report, interleaved

FAMILY = "gpu"
PIPELINE = 5
PROFILED_STEPS = 5
# A smoke test of this family's code without a GPU: PLANWIRE_BENCH_GPU_DEVICE=cpu runs it all on CPU
# (figures meaningless, labelled so); the real run leaves it unset.
DEVICE = os.environ.get("PLANWIRE_BENCH_GPU_DEVICE", "cuda")


def cuda_ready() -> str:
    """'' when plans can run on cuda:0 here, else the reason (one line)."""
    from planwire.worker.device import Device, check_device

    try:
        check_device(Device.parse(DEVICE))
    except (RuntimeError, ValueError) as e:
        return str(e)
    return ""


def memcpy_nodes(data: bytes, feeds: dict[str, np.ndarray], bindings: dict[str, str], steps: int) -> dict:
    """Profile ``steps`` runs of a plan on cuda:0 as the runner runs them (worker/devstore.py): inputs as
    OrtValues on the device, outputs left there, each output named in ``bindings`` fed back as the input it
    names. Returns {"memcpy": Memcpy nodes seen per step, "ops": their op types, "placement": ...}."""
    import onnxruntime as ort

    from planwire.transport.ortoptions import session_options
    from planwire.worker.device import Device
    from planwire.worker.runtime import OrtPlan, ort_device, own_values

    device = Device.parse(DEVICE)
    placed = OrtPlan(data, device=device)  # the worker's placement: strict first, fallback named
    so = session_options(1)
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="planwire-gpu-profile-"), "step")
    if placed.fallback or not device.cuda:
        providers = device.session_providers()
    else:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        providers = device.session_providers(cpu_fallback=False)
    session = ort.InferenceSession(data, so, providers=providers)
    names_in = [i.name for i in session.get_inputs()]
    names_out = [o.name for o in session.get_outputs()]
    upload = ort.OrtValue.ortvalue_from_numpy
    wrapped = {n: upload(np.ascontiguousarray(feeds[n]), device.ort_name, 0) for n in names_in}  # alive to the end
    values = {n: v._ortvalue for n, v in wrapped.items()}
    ib = session.io_binding()._iobinding
    out_device = ort_device(device)
    for _ in range(steps):
        for n in names_in:
            ib.bind_ortvalue_input(n, values[n])
        ib.clear_binding_outputs()
        for n in names_out:
            ib.bind_output(n, out_device)
        session._sess.run_with_iobinding(ib, None)
        outs = own_values(ib.get_outputs(), len(names_out))
        ib.clear_binding_inputs()
        for n, v in zip(names_out, outs, strict=True):
            if n in bindings:
                values[bindings[n]] = v
    with open(session.end_profiling()) as f:
        events = json.load(f)
    copies = [
        e["args"].get("op_name", "")
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and "Memcpy" in e["args"].get("op_name", "")
    ]
    return {"memcpy": len(copies) / steps, "ops": sorted(set(copies)), "placement": placed.placement or str(device)}


def _copies(proc: Any) -> dict[str, int]:
    from planwire.worker.admin import query

    return query(re.search(r"admin on (\S+)", proc.log()).group(1)).device_copies


def _calls(report: Report, gpu: Any, cpu: Any, quick: bool) -> None:
    import torch

    x = torch.randn(16)
    big = torch.randn((64 << 20) // 4)
    cases = []
    for label, w in (("cuda", gpu), ("cpu", cpu)):
        tiny = w.plan_pointer(plans.tiny())
        xp = w.put(x)
        assert torch.allclose(tiny(xp).get(), x * 2 + 1)

        def call(tiny: Any = tiny, xp: Any = xp) -> Any:
            return tiny(xp).get()

        def put_get(w: Any = w) -> Any:
            return w.put(big).get()

        def put_run_get(w: Any = w, tiny: Any = tiny) -> Any:
            return tiny(w.put(big)).get()

        cases += [
            Case(f"tiny call ptr(x).get() [{label} worker, tcp]", call, 200, warmup=20),
            Case(f"64 MiB put + get [{label} worker, tcp]", put_get, 1, warmup=1),
            Case(f"64 MiB put + run (x*2+1) + get [{label} worker, tcp]", put_run_get, 1, warmup=1),
        ]
    samples = interleaved(cases, rounds=3 if quick else 10, budget_s=30 if quick else 90, min_rounds=3 if quick else 5)
    for c in cases:
        report.time(FAMILY, c.name, samples[c.name], "us" if "tiny" in c.name else "ms")
    for what in ("tiny call ptr(x).get()", "64 MiB put + get", "64 MiB put + run (x*2+1) + get"):
        report.ratio(
            f"{what}: CUDA worker vs CPU worker",
            (FAMILY, f"{what} [cuda worker, tcp]"),
            (FAMILY, f"{what} [cpu worker, tcp]"),
            basis="beside: the same calls on one worker of each device",
        )


def _steps(report: Report, gpu: Any, gpu_proc: Any, cpu: Any, wl: Any, quick: bool) -> None:
    import torch

    from bench.training_models import build_plan

    model = wl.make(0)
    plan = build_plan(wl, copy.deepcopy(model))
    x, y = wl.batch(wl.build_batch)
    eager_cuda = torch.cuda.is_available() and DEVICE != "cpu"
    cases, names = [], []
    ptr = plan.send(gpu)
    xp, yp = gpu.put(x), gpu.put(y)
    first = float(ptr(xp, yp).get())
    if eager_cuda:
        dev = torch.device("cuda")
        m = copy.deepcopy(model).to(dev)
        opt = wl.torch_optimizer(m.parameters())
        xc, yc = x.to(dev), y.to(dev)

        def eager_step() -> Any:
            opt.zero_grad()
            loss = wl.loss(m(xc), yc)
            loss.backward()
            opt.step()
            return loss

        base_first = float(eager_step())
        base = f"{wl.name}: eager torch step on CUDA"
    else:
        cpu_ptr = plan.send(cpu)
        cxp, cyp = cpu.put(x), cpu.put(y)
        base_first = float(cpu_ptr(cxp, cyp).get())

        def eager_step() -> Any:
            return cpu_ptr(cxp, cyp).get()

        base = f"{wl.name}: plan step on the CPU worker, synchronous [tcp]"
    assert abs(first - base_first) < 1e-3 * max(1.0, abs(base_first)), (wl.name, first, base_first)

    def sync() -> Any:
        return ptr(xp, yp).get()

    def pipelined() -> Any:
        for _ in range(PIPELINE - 1):
            ptr(xp, yp)
        return ptr(xp, yp).get()

    def baseline() -> Any:
        for _ in range(PIPELINE - 1):
            eager_step()
        return float(eager_step())

    names = [
        f"{wl.name}: plan step on CUDA, synchronous (run + get loss) [tcp]",
        f"{wl.name}: plan step on CUDA, pipelined [tcp]",
        base,
    ]
    cases = [Case(names[0], sync, PIPELINE, warmup=2), Case(names[1], pipelined, 1, warmup=1)]
    cases.append(Case(base, baseline, 1, warmup=1))
    before = _copies(gpu_proc)
    samples = interleaved(cases, rounds=3 if quick else 8, budget_s=30 if quick else 60, min_rounds=3 if quick else 5)
    after = _copies(gpu_proc)
    report.time(FAMILY, names[0], samples[names[0]], "ms")
    for n in names[1:]:
        report.time(FAMILY, n, samples[n].scaled(1 / PIPELINE), "ms", note=f"per step, {PIPELINE} steps per run")
    for mode, n in (("synchronous", names[0]), ("pipelined", names[1])):
        report.ratio(
            f"training step on CUDA vs {'eager CUDA torch' if eager_cuda else 'the CPU worker'}, {wl.name} ({mode})",
            (FAMILY, n),
            (FAMILY, base),
            "<=" if eager_cuda else "",
            1.0 if eager_cuda else None,
            basis="like-for-like: the same GPU" if eager_cuda else "beside: no CUDA torch here, the CPU worker",
        )
    crossed = after["uploads"] - before["uploads"]
    report.count(FAMILY, f"{wl.name}: tensors uploaded to the device during the timed steps", crossed, "tensors")
    report.target(
        f"no state crosses host->device per training step, {wl.name}",
        crossed,
        "<=",
        0,
        "tensors",
        f"worker device_copies: {after['uploads'] - before['uploads']} uploads, "
        f"{after['downloads'] - before['downloads']} downloads (the losses read), "
        f"{after['reused'] - before['reused']} output buffers reused",
        exact=True,  # counted by the worker: no sampling noise
    )
    # the profiler: the step as the runner runs it
    from bench.profile_step import build

    step, batch = build("resnet" if "ResNet" in wl.name else "lm")
    feeds = step.feeds(batch, step.state)
    found = memcpy_nodes(step.variant.data, feeds, dict(step.bindings), PROFILED_STEPS)
    report.target(
        f"Memcpy nodes on a training step's path (onnxruntime profiler), {wl.name}",
        found["memcpy"],
        "<=",
        0,
        "per step",
        f"placement {found['placement']}; copies {', '.join(found['ops']) or 'none'}",
        exact=True,  # nodes counted in the profile
    )
    ptr.free()


def run(env: Env, report: Report, quick: bool) -> None:
    why = cuda_ready()
    if why:
        report.skipped[FAMILY] = f"no CUDA device runs plans here: {why}"
        return
    from bench.env import RemoteWorker
    from planwire.worker.process import WorkerProcess

    warnings.filterwarnings("ignore")
    gpu_proc = WorkerProcess("bench-gpu", extra=["--device", DEVICE, "--host-copy-after", "0"], ready_timeout=120)
    cpu_proc = WorkerProcess("bench-gpu-cpu")
    gpu = cpu = None
    try:
        gpu = RemoteWorker(gpu_proc.url, timeout=300)
        cpu = RemoteWorker(cpu_proc.url, timeout=300)
        found = re.search(r"device cuda:0: (.*)", gpu_proc.log())
        report.note(FAMILY, f"CUDA worker: {found.group(1) if found else 'SMOKE TEST ON CPU, figures meaningless'}")
        _calls(report, gpu, cpu, quick)
        try:
            from planwire.exporter import training_plan  # noqa: F401
        except ImportError as e:
            report.note(FAMILY, f"training steps not measured: training plans not available ({e})")
            return
        from bench.workloads import workloads

        for wl in workloads():
            _steps(report, gpu, gpu_proc, cpu, wl, quick)
    finally:
        for w in (gpu, cpu):
            if w is not None:
                w.close()
        gpu_proc.close()
        cpu_proc.close()
