"""Handles.arguments, the supervisor's side of a run's arguments: what crosses to the runner and what it holds
after. An argument found gone sends nothing and marks nothing held; a tensor passed twice crosses once."""

from __future__ import annotations

import numpy as np
import pytest

from planwire.transport.errors import ProtocolError
from planwire.worker.handles import Handles
from planwire.worker.resident import Resident
from planwire.worker.store import Entry


def fresh(tmp_path) -> Handles:
    handles = Handles(lambda residents: None, str(tmp_path))
    handles.new_generation()  # a runner of generation 1 runs
    return handles


def test_an_argument_found_gone_marks_no_earlier_one_held(tmp_path):
    handles = fresh(tmp_path)
    x = np.arange(4, dtype=np.float32)
    entry = Entry(x)  # a stored tensor at its first use: it would be held from this run on
    gone = Resident(handles, 7, -1, np.dtype(np.float32), (4,))  # held by a runner that died, no host copy
    with pytest.raises(ProtocolError, match="argument 1 is gone"):
        handles.arguments([x, gone], [entry, None], [])
    held = entry.array
    assert isinstance(held, Resident) and held.gen != handles.gen  # the runner never got it
    buffers: list = []
    refs, _ = handles.arguments([held], [entry], buffers)
    assert type(refs[0]) is not int and len(buffers) == 1  # so it crosses again (not a handle the runner lacks)
    assert np.array_equal(np.frombuffer(buffers[0], np.float32), x)
    assert (held.gen, held.handle) == (handles.gen, refs[0].handle)


def test_a_tensor_passed_twice_crosses_once(tmp_path):
    handles = fresh(tmp_path)
    y = Resident(handles, 0, -1, np.dtype(np.float32), (4,), host=np.ones(4, np.float32))  # a host copy only
    buffers: list = []
    refs, _ = handles.arguments([y, y], [None, None], buffers)
    assert type(refs[0]) is not int and refs[1] == refs[0].handle == y.handle and y.gen == handles.gen
    assert len(buffers) == 1
    assert handles.arguments([y, y], [None, None], []) == ([y.handle, y.handle], [])  # held now: handles alone
