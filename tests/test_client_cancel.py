"""Cancelling a run from the Python client (``pointer.cancel()``, ``client.cancel(pointer)``), over the
protocol's ``cancel`` message: on a real plan-worker a running and a queued run are stopped, their outputs
read as failed with the reason ``cancelled``, and the worker goes on; a finished run is not cancelled."""

from __future__ import annotations

import numpy as np
import pytest

import planwire
from planwire.transport import RemoteError
from planwire.transport.spec import PlanVariant, TensorSpec
from planwire.worker.process import WorkerProcess
from tests import handmade
from tests.test_containment import FOREVER, loop_plan


def forever() -> handmade.HandPlan:
    """A Loop of as many trips as its first argument: 10**12 trips run for hours unless stopped."""
    v = PlanVariant(
        loop_plan(),
        (TensorSpec("trips", "int64", ()), TensorSpec("x", "float", (1,))),
        (TensorSpec("y", "float", (1,)),),
    )
    return handmade.HandPlan("forever", v)


def test_cancel_a_running_and_a_queued_run_from_the_client(tmp_path):
    with WorkerProcess("cancel", listen=f"ipc://{tmp_path}/w.ipc") as proc:
        c = planwire.connect(proc.url, timeout=60)
        try:
            long, double = c.plan_pointer(forever()), c.plan_pointer(handmade.double_abs())
            x = c.put(np.array([1, -2], np.float32))
            running = long(FOREVER, np.zeros(1, np.float32))
            queued = double(x)  # waits behind the long run
            after = double(x)
            assert queued.cancel() is True
            assert c.cancel(running) is True
            for p in (running, queued):
                with pytest.raises(RemoteError, match="cancelled") as err:
                    p.get()
                assert err.value.code == "run_failed"
            assert after.get().tolist() == [2, 4]  # the worker went on with what came after
            assert after.cancel() is False  # finished: nothing to cancel
            done = double(x)
            c.flush()
            assert done.cancel() is False
            assert x.get().tolist() == [1, -2]  # nothing stored was lost
            assert "cancelled" in proc.log()
        finally:
            c.close()


def test_cancel_in_process_finds_every_run_finished():
    w = planwire.VirtualWorker(None, id="v")
    p = w.plan_pointer(handmade.double_abs())(np.array([3.0], np.float32))
    assert p.cancel() is False  # an in-process worker answers each run before the next request
    assert p.get().tolist() == [6.0]
    assert w.put(np.ones(1, np.float32)).cancel() is False  # not a run's result
