"""RunForm: a run's header written from a per-variant template is msgspec's encoding of the same Run, byte
for byte (so the worker's exact-header check takes its fast path), whatever the arguments, keys and options."""

from __future__ import annotations

import numpy as np
import pytest

from planwire.transport import messages as m
from planwire.transport.pointers import PointerTensor
from planwire.transport.runs import RunForm, RunTemplate
from planwire.transport.spec import PlanVariant, TensorSpec
from planwire.worker.virtual import VirtualWorker
from tests.handmade import double_abs

TWO_OUT = PlanVariant(
    b"not onnx: only the id and ports matter here",
    (TensorSpec("x", "float", ("n",)), TensorSpec("y", "float", (3,))),
    (TensorSpec("s", "float", ("n",)), TensorSpec("d", "int64", (3,))),
)


@pytest.mark.parametrize(
    ("args", "keys", "fetch", "inline_max"),
    [
        ([m.Arg(ref="ab12cd34-7")], ["ab12cd34-8", "ab12cd34-9"], [], 65536),
        ([m.Arg(ref='a "quoted" key\\ with % and \u00e9'), m.Arg(ref="k")], ["out%d", "o\n2"], [1, 0], 0),
        ([m.Arg(tensor=m.Tensor(dtype="float", shape=[2, 3], frame=0)), m.Arg(ref="w")], ["a", "b"], [0], 7),
        ([], ["a", "b"], [], 0),
    ],
)
def test_a_header_from_the_form_is_msgspecs_encoding_of_the_same_run(args, keys, fetch, inline_max):
    form = RunForm(TWO_OUT, "two")
    encoded = b",".join(m.encoder.encode(a) for a in args)
    got = form.header(123456789, encoded, keys, fetch, inline_max)
    want = m.Run(id=123456789, plan=TWO_OUT.id, args=args, outputs=keys, fetch=fetch, inline_max=inline_max)
    assert got == m.encoder.encode(want)
    fast = m.request_decoder.decode_fast(got)  # the worker's exact-header check: escapes go the full parse
    assert fast == want if b"\\" not in got else fast is None


def test_a_plan_id_with_a_percent_sign_is_written_as_is():
    variant = PlanVariant(b"x", TWO_OUT.inputs, TWO_OUT.outputs, id="100%s-%d")
    header = RunForm(variant, "odd").header(5, b"", ["a", "b"], (), 0)
    assert m.request_decoder.decode(header) == m.Run(id=5, plan="100%s-%d", args=[], outputs=["a", "b"])


def test_runs_send_the_forms_header_and_the_worker_answers_them():
    """Through an in-process worker: a pointer and an inline argument, fresh and caller-named outputs."""
    plan = double_abs().variants[0]  # abs(x + x)
    w = VirtualWorker(id="runs")
    sent: list[bytes] = []
    send = w.connection._send
    w.connection._send = lambda frames: (sent.append(bytes(frames[1])), send(frames))[1]
    w.ensure_plan(plan, "double_abs")
    x = w.put(np.array([1, -2, 3], np.float32))
    (y,) = w.run(plan, [x], name="double_abs")
    (z,) = w.run(plan, [np.full(2, -0.5, np.float32)], outputs=["mine"], fetch=[0], name="double_abs")
    np.testing.assert_array_equal(y.get(), [2, 4, 6])
    np.testing.assert_array_equal(z.get(), [1, 1])
    runs = [h for h in sent if h.startswith(b'{"type":"run",')]
    first, second = (m.request_decoder.decode(h) for h in runs)
    assert first.args == [m.Arg(ref=x.key)] and first.outputs == [y.key] and first.inline_max == w.inline_max
    assert second.args == [m.Arg(tensor=m.Tensor(dtype="float", shape=[2], frame=0))]
    assert second.outputs == ["mine"] and second.fetch == [0] and second.inline_max == 0
    assert runs == [m.encoder.encode(first), m.encoder.encode(second)]


@pytest.mark.parametrize(
    ("plan_id", "inputs", "outputs"),
    [
        ("ab12", [None, "state:w"], ["state:w", None]),
        ('odd "id":0, %s \x00', ['k "q" % \\ \u00e9', None], [None, "o:\x00"]),  # escapes and slot look-alikes
        ("p", ["a", "b"], ["c", "d"]),  # nothing varies but the request id
        ('"\x00', ['k"\x00', None], ['"\x00', None]),  # a quote and NUL: escaped, no slot (review)
        ("\x00", [None, '"\x00"'], [None, '["\x00"]']),
    ],
)
def test_a_templates_header_is_msgspecs_encoding_of_the_same_run(plan_id, inputs, outputs):
    variant = PlanVariant(b"x", TWO_OUT.inputs, TWO_OUT.outputs, id=plan_id)
    template = RunTemplate(variant, "two", inputs, outputs)
    slot_args = iter([m.Arg(ref="x%1"), m.Arg(tensor=m.Tensor(dtype="float", shape=[4], frame=0))])
    args = [next(slot_args) if k is None else m.Arg(ref=k) for k in inputs]
    fresh = [i for i, k in enumerate(outputs) if k is None]
    keys = [f"new-{i}" if k is None else k for i, k in enumerate(outputs)]
    slots = [m.encoder.encode(a) for k, a in zip(inputs, args, strict=True) if k is None]
    got = template.format % (987, *slots, *(m.encoder.encode(keys[i]) for i in fresh))
    assert got == m.encoder.encode(m.Run(id=987, plan=plan_id, args=args, outputs=keys, fetch=fresh))
    assert [d for d, _, _ in template.fresh] == [TWO_OUT.outputs[i].dtype for i in fresh]


def test_a_template_run_reads_stored_inputs_and_returns_only_its_fresh_outputs():
    """Through an in-process worker: a stored input by key, a slot filled per call (pointer or local
    tensor), an output to a key the caller owns and one under a fresh key whose value rides on the reply."""
    plan = double_abs().variants[0]  # abs(x + x)
    w = VirtualWorker(id="template")
    w.ensure_plan(plan, "double_abs")
    x = w.put(np.array([1, -2, 3], np.float32), tags=("x",))
    fixed = RunTemplate(plan, "double_abs", [x.key], [None])
    (y,) = w.run_template(fixed, [])
    w.flush()
    np.testing.assert_array_equal(y.value, [2, 4, 6])  # carried by the reply (None if it were not)
    np.testing.assert_array_equal(y.get(), [2, 4, 6])
    into = RunTemplate(plan, "double_abs", [None], ["mine"])
    assert w.run_template(into, [np.full(2, -0.5, np.float32)]) == []
    assert w.run_template(into, [x]) == []  # the same key, written again
    (mine,) = w.run(plan, [PointerTensor(w, "mine", "float", (3,), owned=False)], name="double_abs")
    np.testing.assert_array_equal(mine.get(), [4, 8, 12])
    with pytest.raises(ValueError, match="has 1 inputs and 1 outputs"):
        RunTemplate(plan, "double_abs", [None, None], [None])
    with pytest.raises(ValueError, match="cannot hold the key"):
        RunTemplate(plan, "double_abs", [None], ["\x00"])
