"""A bounded fuzzing run in the suite (tests/fuzzing.py; `make fuzz MINUTES=N` runs it for longer):
``Service.handle`` answers every generated message with a well-formed reply and never ``internal``;
``check_model`` raises nothing but ``PlanRejected`` on mutated real and hostile plans."""

from __future__ import annotations

import pytest

from tests import fuzzing


@pytest.mark.parametrize("index", [0, 1], ids=["request decoder", "plan checker"])
def test_fuzz_bounded(index: int) -> None:
    fuzzing.properties(200)[index]()
