"""What the client tells its user: an empty search, and large transfers (progress on stderr)."""

from __future__ import annotations

import numpy as np
import pytest

import planwire
from planwire.transport import NothingFound

BIG = np.arange(17 << 20, dtype=np.float32)  # 68 MiB: over the 64 MiB threshold for a progress bar


def test_indexing_an_empty_search_names_the_tags_and_the_worker(worker):
    kept = worker.put(np.ones(2, np.float32), tags=["input_data"])  # noqa: F841  (alive: not freed)
    assert len(worker.search("input_data")) == 1 and worker.search("nope") == []
    with pytest.raises(NothingFound) as info:
        worker.search("input_dta")[0]
    assert isinstance(info.value, IndexError)
    assert str(info.value) == (
        "search('input_dta') found nothing on worker 'device_1': no tensor there carries this tag; "
        "check the spelling, or list what the worker holds with search() (no tags)"
    )
    with pytest.raises(NothingFound, match=r"search\('input_data', 'x'\) found nothing .* all of these tags"):
        worker.search("input_data", "x")[-1]
    with pytest.raises(IndexError, match="list index out of range"):  # a non-empty result indexes as a list
        worker.search("input_data")[1]


def test_large_puts_and_gets_show_progress_on_stderr(capfd, monkeypatch):
    monkeypatch.delenv("PLANWIRE_PROGRESS", raising=False)
    w = planwire.VirtualWorker(id="bars")
    p = w.put(BIG, key="big")
    back = p.get()
    np.testing.assert_array_equal(np.asarray(back), BIG)
    out, err = capfd.readouterr()
    assert out == ""
    lines = [line.strip("\r") for line in err.splitlines()]
    put = [line for line in lines if line.startswith("put of 'big' to bars:")]
    get = [line for line in lines if line.startswith("get of 'big' from bars:")]
    assert len(put) == 2 and len(get) == 2, err  # not a terminal: a line when it starts, one when done
    assert " 0%|" in put[0] and "100%|" in put[1] and "68.0M/68.0M" in put[1]
    assert " 0%|" in get[0] and "100%|" in get[1]
    assert err.isascii()


def test_progress_can_be_turned_off_and_small_transfers_are_quiet(capfd, monkeypatch):
    w = planwire.VirtualWorker(id="quiet")
    w.put(np.ones(1000, np.float32)).get()  # small: no bar
    w.put(BIG, progress=False).get(progress=False)
    monkeypatch.setenv("PLANWIRE_PROGRESS", "0")
    w.put(BIG).get()
    assert capfd.readouterr().err == ""
