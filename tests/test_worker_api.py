"""The worker-facing API (pointers, plans, ownership, errors) against every kind of worker."""

from __future__ import annotations

import gc

import pytest
import torch

import planwire
from planwire.transport import ForbiddenError, PointerTensor, PrivateDataError, RemoteError, UnknownTensorError
from planwire.transport.arrays import set_tags
from tests import handmade

DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool]


def seed_data():
    return (
        set_tags(torch.tensor([-1, 2.0]), ["input_data"]),
        set_tags(torch.tensor([1, -2.0]), ["input_data2", "x"]),
    )


def test_search_returns_pointers_with_shape_dtype_tags(worker_factory):
    w = worker_factory("device_1", data=seed_data())
    (p,) = w.search("input_data")
    assert isinstance(p, PointerTensor)
    assert (p.dtype, p.shape, p.tags, p.owned, p.private) == ("float", (2,), ("input_data",), False, True)
    assert "device_1" in repr(p) and "float32[2]" in repr(p)
    assert [q.tags for q in w.search("input_data2", "x")] == [("input_data2", "x")]
    assert w.search("input_data", "x") == []
    assert len(w.search()) == 2


def test_private_data_never_leaves_or_dies(worker_factory):
    w = worker_factory("device_1", data=seed_data())
    (p,) = w.search("input_data")
    with pytest.raises(PermissionError, match="own data"):
        p.get()
    with pytest.raises(ForbiddenError, match="cannot be deleted"):
        w.delete(p)
    with pytest.raises(ForbiddenError, match="cannot be overwritten"):
        w.put(torch.zeros(2), key=p.key)
    del p
    gc.collect()
    (p,) = w.search("input_data")  # still there, and plans can use it
    out = w.plan_pointer(handmade.double_abs())(p)
    with pytest.raises(PrivateDataError, match="computed from this worker's private data"):
        out.get()  # a result computed from private data is private too
    again = w.plan_pointer(handmade.double_abs())(out)  # ... and may be used by later runs
    with pytest.raises(PrivateDataError):
        again.get()


def test_public_worker_lets_copies_out_but_keeps_its_data(worker_factory):
    w = worker_factory("device_1", data=seed_data(), public=True)
    (p,) = w.search("input_data")
    assert p.get().tolist() == [-1.0, 2.0]
    assert p.get().tolist() == [-1.0, 2.0]  # copied, not moved
    assert len(w.search("input_data")) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_put_get_round_trip_every_dtype(worker, dtype):
    t = (torch.arange(6).reshape(2, 3) % 3 - 1).to(dtype)
    p = worker.put(t)
    assert p.shape == (2, 3)
    back = p.get(keep=True)
    assert back.dtype == dtype and torch.equal(back, t)
    assert torch.equal(p.get(), t)
    with pytest.raises(ValueError, match="already fetched"):
        p.get()


def test_scalars_and_empty_tensors(worker):
    for t in (torch.tensor(3.5), torch.zeros(0, 4), torch.ones(1, 1, 1, dtype=torch.int32)):
        back = worker.put(t).get()
        assert back.shape == t.shape and torch.equal(back, t)


def test_unknown_key_is_a_clear_error(worker):
    p = worker.put(torch.ones(2))
    worker.delete(p)
    ghost = PointerTensor(worker, p.key, "float", (2,), owned=False)
    with pytest.raises(UnknownTensorError, match=p.key):
        ghost.get()


def test_plan_runs_on_pointers_and_inline_tensors(worker):
    pp = worker.plan_pointer(handmade.sum_and_diff())
    x = worker.put(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    for n in (1, 2, 5):  # dynamic axis at several sizes
        y = torch.arange(2 * n, dtype=torch.float32).reshape(n, 2)
        xs = x if n == 2 else torch.ones(n, 2)
        s, d = pp(xs, y)
        expect = torch.tensor([[1.0, 2.0], [3.0, 4.0]]) if n == 2 else torch.ones(n, 2)
        assert torch.equal(s.get(), expect + y) and torch.equal(d.get(), expect - y)
    assert x.get(keep=True).shape == (2, 2)  # inputs are not consumed by runs


def plan_uploads(w, data: bytes) -> list[int]:
    """Counts, in a one-item list, the requests ``w`` sends from now on that carry ``data`` as a frame."""
    sent = [0]
    send = w._send

    def counting_send(frames):
        sent[0] += any(bytes(f) == data for f in frames)
        send(frames)

    w._send = counting_send
    return sent


def test_plan_bytes_sent_once_and_shared_by_workers(worker_factory):
    w1 = worker_factory("device_1", data=seed_data(), public=True)
    w2 = worker_factory("device_2", data=seed_data(), public=True)
    plan = handmade.double_abs()
    data = plan.variants[0].data
    up1, up2 = plan_uploads(w1, data), plan_uploads(w2, data)
    p1, p2 = w1.plan_pointer(plan), w2.plan_pointer(plan)
    assert (up1[0], up2[0]) == (1, 1)  # once to each worker
    assert w1.plan_pointer(plan) is p1
    for _ in range(3):  # later calls name the plan by id: the bytes are not sent again
        r1, r2 = p1(w1.search("input_data")[0]), p2(w2.search("input_data")[0])
        assert r1.get().tolist() == r2.get().tolist() == [2.0, 4.0]  # abs(x + x) of the seed's [-1, 2]
    assert w2.plan_pointer(handmade.double_abs()) is not p2  # a new plan object with the same bytes...
    assert (up1[0], up2[0]) == (1, 1)  # ...is known by its id: still sent once


def test_bad_arguments_are_refused_before_running(worker):
    pp = worker.plan_pointer(handmade.sum_and_diff())
    x = worker.put(torch.ones(2, 2))
    with pytest.raises(TypeError, match=r"expected 2 arguments, got 1"):
        pp(x)
    with pytest.raises(TypeError, match=r"argument 1 \('y'\): expected dtype float32, got int64"):
        pp(x, torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"argument 0 \('x'\): expected rank 2"):
        pp(torch.ones(2), x)
    assert torch.equal(x.get(), torch.ones(2, 2))  # nothing lost


def test_pointer_to_another_worker_or_consumed_is_refused(worker_factory):
    w1, w2 = worker_factory("device_1"), worker_factory("device_2")
    pp = w1.plan_pointer(handmade.double_abs())
    foreign = w2.put(torch.ones(3))
    with pytest.raises(ValueError, match="points to worker 'device_2'"):
        pp(foreign)
    mine = w1.put(torch.ones(3))
    mine.get()
    with pytest.raises(ValueError, match="already fetched"):
        pp(mine)


def test_failed_run_surfaces_on_get_naming_plan_and_worker(worker):
    pp = worker.plan_pointer(handmade.reshape_to_3())
    bad = pp(torch.ones(4))  # returns at once; the run fails on the worker
    good = pp(torch.ones(3))
    with pytest.raises(RemoteError, match=r"plan 'reshape_to_3' failed on worker 'device_1'") as info:
        bad.get()
    assert info.value.code == "run_failed"
    assert good.get().tolist() == [1.0, 1.0, 1.0]


def test_results_are_freed_when_pointers_are_collected(worker):
    pp = worker.plan_pointer(handmade.double_abs())
    x = worker.put(torch.ones(3))
    keys = []
    for _ in range(5):
        r = pp(x)
        keys.append(r.key)
        del r
    gc.collect()
    worker.flush()
    ghosts = [PointerTensor(worker, k, "float", (3,), owned=False) for k in keys]
    for g in ghosts:
        with pytest.raises(UnknownTensorError):
            g.get()
    assert x.get().tolist() == [1.0, 1.0, 1.0]


def test_send_and_tag_without_the_hook(worker):
    t = planwire.tag(torch.tensor([1.0, 2.0]), "a", "b")
    p = planwire.send(t, worker)
    assert p.tags == ("a", "b") and [q.key for q in worker.search("a", "b")] == [p.key]


class CountingVirtualWorker(planwire.VirtualWorker):
    """A real VirtualWorker that counts the request messages its Service handles."""

    def __init__(self, *args, **kwargs) -> None:
        self.requests = 0
        super().__init__(*args, **kwargs)
        send = self.connection._send

        def counting(frames):
            self.requests += 1
            send(frames)

        self.connection._send = counting


def test_small_results_ride_on_the_run_reply_so_get_costs_no_message():
    w = CountingVirtualWorker(id="counted")
    pp = w.plan_pointer(handmade.double_abs())
    x = w.put(torch.tensor([-1.0, 2.0]))
    before = w.requests
    assert pp(x).get().tolist() == [2.0, 4.0]
    assert w.requests - before == 1  # one run; the value came back with its reply
    w.inline_max = 0
    w.flush()  # send the pending free of the first result
    before = w.requests
    assert pp(x).get().tolist() == [2.0, 4.0]
    assert w.requests - before == 2  # run, then get


def test_frees_of_fetched_results_are_batched_and_bounded():
    w = CountingVirtualWorker(id="counted")
    pp = w.plan_pointer(handmade.double_abs())
    x = w.put(torch.ones(3))
    stored = len(w.service.store)
    before = w.requests
    for _ in range(300):
        assert pp(x).get().tolist() == [2.0, 2.0, 2.0]
    assert w.requests - before < 300 * 1.1  # about one message per call, frees included
    assert len(w.service.store) - stored <= 64  # moved results do not pile up on the worker
    w.flush()
    assert len(w.service.store) == stored


def test_inline_values_follow_get_semantics(worker):
    pp = worker.plan_pointer(handmade.double_abs())
    r = pp(torch.tensor([1.0, -3.0]))
    assert r.shape == (2,)  # known from the reply, no describe needed
    assert r.get(keep=True).tolist() == [2.0, 6.0]
    assert r.get().tolist() == [2.0, 6.0]
    with pytest.raises(ValueError, match="already fetched"):
        r.get()
    big = pp(torch.ones(40_000))  # 160 kB: over inline_max, fetched with a get
    assert big.get().sum().item() == 80_000.0


def test_every_read_of_a_value_the_reply_carried_is_a_copy_of_its_own(worker):
    pp = worker.plan_pointer(handmade.double_abs())
    r = pp(torch.tensor([1.0, -3.0]))  # small: the reply carries the value, the pointer keeps it
    first = r.get(keep=True)
    first[0] = 99.0
    shown = r.value
    shown[1] = -1.0
    second = r.get(keep=True)
    assert second.tolist() == [2.0, 6.0]  # neither write reached the kept value
    second[0] = 7.0
    assert r.value.tolist() == [2.0, 6.0]
    assert first.tolist() == [99.0, 6.0] and second.tolist() == [7.0, 6.0]  # and no two reads share memory
    moved = r.get()
    assert moved.tolist() == [2.0, 6.0] and first.tolist() == [99.0, 6.0]
    moved[1] = 0.0
    assert second.tolist() == [7.0, 6.0]
    chained = pp(pp(torch.tensor([-1.0])))  # an inline result is still stored: usable as an argument
    assert chained.get().tolist() == [4.0]


def test_keys_a_call_makes_and_keys_asked_for_come_from_one_sequence(worker):
    first = worker.new_key()
    prefix, _, n = first.rpartition("-")
    s, d = worker.plan_pointer(handmade.sum_and_diff())(torch.ones(2, 2), torch.ones(2, 2))
    (r,) = worker.new_keys(1)
    p = worker.put(torch.ones(1))
    assert [s.key, d.key, r, p.key] == [f"{prefix}-{int(n) + i}" for i in (1, 2, 3, 4)]
    assert torch.equal(s.get(), torch.full((2, 2), 2.0)) and torch.equal(d.get(), torch.zeros(2, 2))
