"""What the sandboxed runner says of the outputs it holds (worker/pipe.py): an output sent without data whose
dtype and shape are those of the same output in its previous answer, to a run of the same plan, is only
``SAME`` there (a training step's new state), anything else in full. The supervisor's view of each stored
output (describe, get) follows every change of shape, whichever plan ran in between."""

from __future__ import annotations

import numpy as np

from planwire.transport import connect
from planwire.worker.process import WorkerProcess
from tests import handmade


def test_stored_outputs_keep_their_own_dtype_and_shape_across_runs() -> None:
    with WorkerProcess("answers", extra=["--direct-max-mb", "0"]) as proc:  # every run in the runner
        w = connect(proc.url, timeout=30)
        try:
            w.inline_max = 0  # every output stays on the worker: described by the runner's answer alone
            double, pair = w.plan_pointer(handmade.double_abs()), w.plan_pointer(handmade.sum_and_diff())
            runs = []
            for n in (3, 3, 5, 5, 3, 0, 0, 3):  # same shapes twice, then others; the other plan in between
                x = np.arange(n, dtype=np.float32) - 1
                runs.append(((n,), double(w.put(x)), np.abs(x + x)))
                w.describe(runs[-1][1])  # answered before the next is sent (else it sends its outputs' data)
                if n == 5:
                    a, b = np.ones((n, 2), np.float32), np.full((n, 2), 3, np.float32)
                    s, d = pair(w.put(a), w.put(b))
                    runs += [((n, 2), s, a + b), ((n, 2), d, a - b)]
                    w.describe(s)
            infos = w.describe(*(p for _, p, _ in runs))
            assert [tuple(i.shape) for i in infos] == [shape for shape, _, _ in runs]
            assert {i.dtype for i in infos} == {"float"}  # (wire names)
            for _, p, want in runs:
                np.testing.assert_array_equal(p.get(), want)
        finally:
            w.close()
