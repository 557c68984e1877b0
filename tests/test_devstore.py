"""The runner's tensors by handle (worker/devstore.py): the bytes of its own memory they hold (what the
runner's data bound allows for) are counted once per value, whoever read its size, and given back exactly."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from planwire.worker.device import Device
from planwire.worker.devstore import DeviceStore, described, value_info, value_nbytes
from planwire.worker.runtime import OrtPlan
from tests.hostile import checked


def _value(shape: tuple[int, ...], dtype: type = np.float32) -> object:
    return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cpu")._ortvalue


def test_value_info_reads_dtype_shape_and_bytes() -> None:
    v = _value((3, 5), np.float64)
    assert value_info(v) == ("double", [3, 5], 120)  # wire dtype names (PROTOCOL.md)
    assert value_nbytes(v) == 120


def test_private_bytes_are_counted_once_per_value_and_given_back() -> None:
    store = DeviceStore(Device.parse("cpu", 0))
    a, b = _value((128, 64)), _value((10,))
    store.hold(1, a, own=True)  # size read here
    store.hold(2, b, own=True, nbytes=40)  # size read by the caller
    assert store.private_bytes == 128 * 64 * 4 + 40
    host = np.ones(1000, np.float32)
    store.hold(3, *store.wrap(host))  # wraps host memory: not the runner's own
    assert store.private_bytes == 128 * 64 * 4 + 40
    store.hold(1, _value((4,)), own=True)  # a handle held again: the old value's bytes go
    assert store.private_bytes == 16 + 40
    store.free([1, 2, 3, 99])  # an unknown handle is ignored
    assert store.private_bytes == 0 and len(store) == 0
    reused = store.buffers([("tensor(float)", (4,)), ("tensor(float)", (10,)), ("tensor(int64)", (1,))])
    assert reused is not None and [r is None for r in reused] == [False, False, True]


def test_described_matches_what_onnxruntime_says() -> None:
    for shape, dtype in (((3, 5), np.float64), ((), np.int64), ((2, 0, 4), np.float32)):
        v = _value(shape, dtype)
        assert described(v.data_type(), tuple(v.shape())) == value_info(v)


def test_a_freed_buffer_joins_the_pool_once_its_last_handle_goes() -> None:
    """Address and (type, shape) are read once when held: a freed output joins the pool of that kind, and
    memory two handles share (an output aliasing another) only when both are gone."""
    store = DeviceStore(Device.parse("cpu", 0))
    a, b = _value((8, 4)), _value((8, 4))
    kind = (a.data_type(), tuple(a.shape()))
    store.hold(1, a, own=True, nbytes=128, ptr=a.data_ptr(), kind=kind)
    store.hold(2, a, own=True, nbytes=128)  # the same memory under a second handle (read here)
    store.hold(3, b, own=True, nbytes=128, ptr=b.data_ptr(), kind=kind)
    store.free([1, 3])
    reused = store.buffers([kind, kind, kind])
    assert reused is not None and store.lending == 1  # b only: a is still held under handle 2
    assert reused[0].data_ptr() == b.data_ptr() and reused[1] is None and reused[2] is None
    assert store.addresses == [b.data_ptr(), 0, 0]
    store.release_pool()
    store.free([2])
    reused = store.buffers([kind])
    assert reused is not None and reused[0].data_ptr() == a.data_ptr() and store.lending == 1
    store.release_pool()
    assert store.buffers([kind]) is None and store.lending == 0


def test_outputs_written_into_their_pooled_buffers_are_those_buffers() -> None:
    """A training step's state: outputs bound to the buffers of the state two steps back come back as those
    very buffers (no new value per output) holding the new values; an output given no buffer is a value of
    its own; a buffer onnxruntime did not write into (another address) is not taken for the output."""
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("x", "y", "z")]
    plan = OrtPlan(
        checked([helper.make_node("Add", ["x", "x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])], io[:1], io[1:])
    )
    store = DeviceStore(Device.parse("cpu", 0))
    x, _ = store.upload(np.arange(3, dtype=np.float32))
    first = plan.run_bound([x])
    kinds = [(v.data_type(), tuple(v.shape())) for v in first]
    for h, v in enumerate(first, 1):
        store.hold(h, v, own=True, ptr=v.data_ptr(), kind=kinds[h - 1])
    store.free([1, 2])
    buffers = store.buffers(kinds)
    assert buffers is not None and store.addresses == [b.data_ptr() for b in buffers]
    assert sorted(store.addresses) == sorted(v.data_ptr() for v in first)
    x2, _ = store.upload(np.array([5, 6, 7], np.float32))
    again = plan.run_bound([x2], buffers, addresses=store.addresses)
    assert again[0] is buffers[0] and again[1] is buffers[1]
    assert again[0].numpy().tolist() == [10, 12, 14] and again[1].numpy().tolist() == [-5, -6, -7]
    fresh = plan.run_bound([x], [buffers[0], None], addresses=[store.addresses[0], 0])
    assert fresh[0] is buffers[0] and fresh[1] is not buffers[1] and fresh[1].data_ptr() != store.addresses[1]
    assert fresh[0].numpy().tolist() == [0, 2, 4] and fresh[1].numpy().tolist() == [0, -1, -2]
    wrong = plan.run_bound([x2], buffers, addresses=[1, 1])  # addresses that are not the buffers': not taken
    assert wrong[0] is not buffers[0] and wrong[0].numpy().tolist() == [10, 12, 14]
