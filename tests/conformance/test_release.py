"""PROTOCOL.md §6.4: results computed from private data leave only as the data owner's rules say."""

from __future__ import annotations

import numpy as np
import pytest

from . import plans
from .data import OWN
from .test_private import own_keys


@pytest.fixture
def owner(connect, policy_url):
    return connect(policy_url)


def test_an_approved_output_leaves_as_it_is(owner, uid):
    pid = owner.register(plans.LEAKS["identity"][0])["plan"]
    x = own_keys(owner)["weights"]["key"]
    assert np.array_equal(owner.run(pid, [x], [uid], fetch=[0]).arrays()[uid], OWN["weights"])
    assert np.array_equal(owner.get1(uid, keep=True), OWN["weights"])  # and by get, the same value
    header, frames = owner.run_header(pid, [x], [f"{uid}-i"])
    assert np.array_equal(owner.ok({**header, "inline_max": 1 << 10}, frames).arrays()[f"{uid}-i"], OWN["weights"])


def test_a_plan_without_a_rule_releases_nothing(owner, uid):
    pid = owner.register(plans.LEAKS["add_zero"][0])["plan"]
    x = own_keys(owner)["weights"]["key"]
    owner.error(*owner.run_header(pid, [x], [uid], fetch=[0]), code="private_data")


def test_min_batch_counts_the_rows_of_the_workers_data(owner, uid):
    pid = owner.register(plans.LEAKS["slice"][0])["plan"]  # approved from 3 rows; weights has 2
    x = own_keys(owner)["weights"]["key"]
    reply = owner.error(*owner.run_header(pid, [x], [uid], fetch=[0]), code="private_data")
    assert uid in reply["message"]
    header, frames = owner.run_header(pid, [x], [uid])
    assert owner.ok({**header, "inline_max": 1 << 10}, frames).kind == "ok"  # stored, not returned
    reply = owner.error({"type": "get", "keys": [uid]}, code="private_data")
    assert "2 rows" in reply["message"] and "3" in reply["message"]


def test_a_bounded_input_out_of_bounds_refuses_the_run(owner, uid):
    pid = owner.register(plans.scaled())["plan"]
    x = own_keys(owner)["weights"]["key"]
    reply = owner.error(*owner.run_header(pid, [x, np.float32(2.0)], [uid], fetch=[0]), code="private_data")
    assert "'s'" in reply["message"] and "1.0" in reply["message"]
    owner.error({"type": "describe", "keys": [uid]}, code="run_failed")  # nothing ran
    out = owner.run(pid, [x, np.float32(0.5)], [uid], fetch=[0]).arrays()[uid]
    assert np.array_equal(out, OWN["weights"] * 0.5)


def test_an_update_is_measured_from_the_value_the_client_stored(owner, uid):
    pid = owner.register(plans.accumulate())["plan"]
    x = own_keys(owner)["weights"]["key"]
    owner.put(uid, np.full((2, 3), 100.0, np.float32))
    for _ in range(2):  # in place: the second step reads the first one's private result
        owner.run(pid, [uid, x], [uid])
    assert (owner.ok({"type": "describe", "keys": [uid]})["tensors"][0]).get("private") is True
    assert np.allclose(owner.get1(uid, keep=True), 2 * OWN["weights"])  # the change, not 100 + 2 x
