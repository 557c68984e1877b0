"""exporter/reach.py, the walk behind a plan's cache key: what it reaches, what it never runs, where it stops."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from planwire.exporter import func2plan
from planwire.exporter.fingerprint import function_fingerprint


class Box:
    """A plain user object."""

    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)


class Remote:
    """A user's proxy: slots, and any other attribute read is a (failing) remote call."""

    __slots__ = ("conn",)
    reads: list[str] = []

    def __getattr__(self, name: str) -> object:
        Remote.reads.append(name)
        raise RuntimeError("remote not connected")


P = Box(w=torch.tensor(2.0))
C = Box(z=Box(p=P))
A = Box(x=Box(y=C))  # A.x.y is C: C is reached two objects down under A, and directly
NESTED: list = []
for _ in range(3000):
    NESTED = [NESTED]
CLIENT = Remote()


def _deep(x: torch.Tensor) -> torch.Tensor:
    _ = A  # sorts before C: the walk meets C under A first
    return torch.where(x > 50, x * C.z.p.w, x)


def test_an_object_met_deep_first_is_walked_again_from_nearer() -> None:
    before = function_fingerprint(_deep)
    P.w = torch.tensor(5.0)
    try:
        assert function_fingerprint(_deep) != before  # C.z.p.w is three objects from C: keyed
    finally:
        P.w = torch.tensor(2.0)


def test_the_walk_runs_no_user_attribute_code_and_ends_on_deep_nesting() -> None:
    def uses(x: torch.Tensor) -> torch.Tensor:
        _ = CLIENT, NESTED
        return x * 2

    Remote.reads.clear()  # (pytest's collection read some of the module's attributes)
    function_fingerprint(uses)  # no __getattr__('__dict__') of the proxy, no RecursionError
    assert Remote.reads == []


class PinnedBN(nn.BatchNorm1d):
    track_running_stats = True  # a subclass defining the attribute at class level


def test_a_batchnorm_subclass_defining_track_running_stats_builds() -> None:
    net = nn.Sequential(nn.Linear(4, 3), PinnedBN(3))
    stats = net[1].running_mean.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")

        @func2plan(args_shape=[(8, 4)])
        def pinned(x: torch.Tensor) -> torch.Tensor:
            return net(x)

    x = torch.randn(8, 4)
    with torch.no_grad():
        expected = torch.nn.functional.batch_norm(net[0](x), None, None, net[1].weight, net[1].bias, training=True)
    torch.testing.assert_close(pinned(x), expected, rtol=1e-4, atol=1e-5)
    assert net[1].track_running_stats is True and torch.equal(net[1].running_mean, stats)
