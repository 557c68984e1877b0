"""The seed tutorial (PySyft 0.2 Plans), cell by cell, on planwire.

Run alone it uses in-process VirtualWorkers; ``examples/demo.py`` runs it against two real plan-worker
processes through ``planwire.connect``. Every printed result is also checked.

The seed's devices hold a tutorial's toy data and hand back the results of plans on it, so they are
started public (``--public``): on a private worker, results computed from its data never leave it unless
its owner's policy releases them (see examples/federated.py).
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

import planwire as sy

# The seed's plans are built for the example's own sizes, as in the tutorial: no batch-size warning here.
warnings.filterwarnings("ignore", category=sy.FixedShapeWarning)


def seed_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The data each device holds in the seed (a tutorial's, public: plans' results on it come back)."""
    return torch.tensor([-1, 2.0]).tag("input_data"), torch.tensor([1, -2.0]).tag("input_data2")


class Net(sy.Plan):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = self.fc2(x)
        return F.log_softmax(x, dim=0)


def cell(title: str) -> None:
    print(f"\n## {title}")


def main(devices: tuple | None = None) -> None:
    hook = sy.TorchHook(torch)
    hook.local_worker.is_client_worker = False  # accepted for compatibility; planwire has no local worker mode
    if devices is None:
        device_1 = sy.VirtualWorker(hook, id="device_1", data=seed_data(), public=True)
        device_2 = sy.VirtualWorker(hook, id="device_2", data=seed_data(), public=True)
    else:
        device_1, device_2 = devices
    print("devices:", device_1, device_2)

    cell("1. a plan from a function")

    @sy.func2plan()
    def plan_double_abs(x):
        x = x + x
        x = torch.abs(x)
        return x

    print(repr(plan_double_abs))
    pointer_to_data = device_1.search("input_data")[0]
    print(pointer_to_data)
    print("is_built:", plan_double_abs.is_built)
    try:
        plan_double_abs.send(device_1)
    except RuntimeError as error:
        print(error)
        assert str(error) == "A plan needs to be built before being sent to a worker."
    plan_double_abs.build(torch.tensor([1.0, -2.0]))
    print("is_built:", plan_double_abs.is_built)
    pointer_plan = plan_double_abs.send(device_1)
    print(pointer_plan)
    pointer_to_result = pointer_plan(pointer_to_data)
    print(pointer_to_result)
    result = pointer_to_result.get()
    print(result)
    assert torch.equal(result, torch.tensor([2.0, 4.0]))

    cell("2. a plan from a module")
    torch.manual_seed(0)
    net = Net()
    print(repr(net))
    net.build(torch.tensor([1.0, 2.0]))
    pointer_to_net = net.send(device_1)
    print(pointer_to_net)
    pointer_to_data = device_1.search("input_data")[0]
    pointer_to_result = pointer_to_net(pointer_to_data)
    print(pointer_to_result)
    out_1 = pointer_to_result.get()
    print(out_1)
    with torch.no_grad():  # eager torch on the Net's own layers (net(x) would run the same ONNX graph)
        x = torch.tensor([-1, 2.0])
        expected = F.log_softmax(net.fc2(F.relu(net.fc1(x))), dim=0)
    assert torch.allclose(out_1, expected, atol=1e-6), (out_1, expected)

    cell("3. switching between workers")
    pointer_to_net_2 = net.send(device_2)
    out_2 = pointer_to_net_2(device_2.search("input_data")[0]).get()
    print(out_1, out_2, sep="\n")
    assert torch.equal(out_1, out_2)

    cell("4. plans built at decoration")

    @sy.func2plan(args_shape=[(-1, 1)])
    def plan_double_abs_auto(x):
        x = x + x
        x = torch.abs(x)
        return x

    print("is_built:", plan_double_abs_auto.is_built)
    assert plan_double_abs_auto.is_built

    @sy.func2plan(args_shape=[(1, 2), (-1, 2)])
    def plan_sum_abs(x, y):
        s = x + y
        return torch.abs(s)

    print("is_built:", plan_sum_abs.is_built)
    y = torch.tensor([[1.0, -5.0], [2.0, 2.0], [0.0, 0.0]])
    got = plan_sum_abs.send(device_1)(torch.tensor([[1.0, 1.0]]), y).get()
    assert torch.equal(got, torch.abs(torch.tensor([[1.0, 1.0]]) + y))

    @sy.func2plan(args_shape=[(1,)], state=(torch.tensor([1]),))
    def plan_abs(x, state):
        (bias,) = state.read()
        x = x.abs()
        return x + bias

    pointer_plan = plan_abs.send(device_1)
    x_ptr = torch.tensor([-1, 0]).send(device_1)
    p = pointer_plan(x_ptr)
    result = p.get()
    print(result)
    assert torch.equal(result, torch.tensor([2, 1]))
    print("\nseed walkthrough: all cells reproduced")


if __name__ == "__main__":
    main()
    sys.exit(0)
