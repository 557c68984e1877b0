"""The data owner's release rules (--policy), the audit log (--audit) and plan review, in process
(VirtualWorker: the same Service) and through real plan-worker processes (SIGHUP reload)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import helper

import planwire
from planwire.transport import PrivateDataError
from planwire.worker import VirtualWorker
from planwire.worker.policy import PolicyError, load, parse
from planwire.worker.process import WorkerProcess
from planwire.worker.review import format_review, policy_snippet, review
from tests import handmade
from tests.conformance.workers import KINDS, node_missing, start


def copy_plan() -> handmade.HandPlan:
    """y = x (a plan that would hand private data back as it is)."""
    v = handmade.variant([helper.make_node("Identity", ["x"], ["y"])], [("x", "float", ["N"])], [("y", "float", ["N"])])
    return handmade.HandPlan("copy", v)


def step_plan() -> handmade.HandPlan:
    """(w, x, lr) -> (new_w, loss): new_w = w + lr * x (a 'training step' on the private x), loss = sum(x)."""
    v = handmade.variant(
        [
            helper.make_node("Mul", ["x", "lr"], ["d"]),
            helper.make_node("Add", ["w", "d"], ["new_w"]),
            helper.make_node("ReduceSum", ["x"], ["loss"], keepdims=0),
        ],
        [("w", "float", ["N"]), ("x", "float", ["N"]), ("lr", "float", [])],
        [("new_w", "float", ["N"]), ("loss", "float", [])],
    )
    return handmade.HandPlan("step", v)


def rules(text: str, fp: str) -> str:
    return f'[[plan]]\nfingerprint = "{fp}"\nname = "test"\n{text}\n'


def virtual(tmp_path: Path, policy_text: str, data: np.ndarray) -> tuple[VirtualWorker, Path]:
    path = tmp_path / "policy.toml"
    path.write_text(policy_text)
    audit = tmp_path / "audit.jsonl"
    return VirtualWorker(None, id="owner", data=[data], policy=load(path), audit=str(audit)), audit


def audit_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_step(w, plan, *args, outputs, fetch=()):
    """Run a plan by hand (the raw client API) with chosen output keys; returns the result pointers."""
    variant = plan.variants[0]
    w.ensure_plan(variant, plan.name)
    return w.run(variant, list(args), outputs=outputs, fetch=fetch, wait=True)


def test_without_a_rule_nothing_leaves_and_the_refusal_is_audited(tmp_path):
    secret = np.float32([3, 1, 4])
    w, audit = virtual(tmp_path, rules('outputs.y = "as_is"', "0" * 64), secret)
    (x,) = w.search()
    out = w.plan_pointer(copy_plan())(x)
    with pytest.raises(PrivateDataError):
        out.get()
    (line,) = audit_lines(audit)
    assert line["event"] == "refused" and line["shapes"] == [[3]] and line["rule"] == "none"
    assert line["client"].startswith("conn:") and "never leaves" in line["reason"]


def test_an_approved_output_leaves_as_is_and_is_audited(tmp_path):
    secret = np.float32([3, 1, 4])
    fp = copy_plan().variants[0].id
    w, audit = virtual(tmp_path, rules('outputs.y = "as_is"', fp), secret)
    (x,) = w.search()
    assert w.plan_pointer(copy_plan())(x).get().tolist() == [3.0, 1.0, 4.0]
    (line,) = audit_lines(audit)
    assert line["event"] == "released" and line["plan"] == fp and line["outputs"] == ["y"]
    assert line["bytes"] == 12 and line["rule"] == "y: as_is" and "noise_multiplier" not in line


def test_min_batch_refuses_releases_from_too_few_rows(tmp_path):
    fp = copy_plan().variants[0].id
    w, audit = virtual(tmp_path, rules('min_batch = 4\noutputs.y = "as_is"', fp), np.float32([3, 1, 4]))
    (x,) = w.search()
    with pytest.raises(PrivateDataError, match="computed on 3 rows of private data; .* only from 4"):
        w.plan_pointer(copy_plan())(x).get()
    assert audit_lines(audit)[-1]["event"] == "refused"


def test_describe_says_how_a_private_result_would_leave_without_releasing_it(tmp_path):
    fp = step_plan().variants[0].id
    w, audit = virtual(tmp_path, rules('outputs.new_w = { update = "w" }', fp), np.float32([3, 1, 4]))
    (x,) = w.search()
    new_w, loss = run_step(w, step_plan(), np.float32([1, 1, 1]), x, np.float32(0.5), outputs=["w1", "l1"])
    info_w, info_loss, info_x = w.describe(new_w, loss, x)
    assert (info_w.private, info_w.release) == (True, "update")
    assert info_loss.private and not isinstance(info_loss.release, str)  # no rule for it: it never leaves
    assert info_x.private and not isinstance(info_x.release, str)  # the worker's own data
    assert not audit.exists() or not audit_lines(audit)  # describing released nothing
    assert new_w.get().tolist() == [1.5, 0.5, 2.0]  # the update, as describe said


def test_input_bounds_refuse_the_run_before_it_runs(tmp_path):
    plan = step_plan()
    fp = plan.variants[0].id
    text = rules('outputs.loss = "as_is"\ninputs.lr = { min = 0.0, max = 0.5 }', fp)
    w, audit = virtual(tmp_path, text, np.float32([1, 2]))
    (x,) = w.search()
    with pytest.raises(PrivateDataError, match=r"only with input 'lr' in \[0.0, 0.5\].*must be at least 0.0"):
        run_step(w, plan, np.float32([0, 0]), x, np.float32(-1), outputs=["w", "loss"], fetch=[1])
    assert audit_lines(audit)[-1]["event"] == "refused"
    _, loss = run_step(w, plan, np.float32([0, 0]), x, np.float32(0.1), outputs=["w2", "loss2"], fetch=[1])
    assert loss.get().tolist() == 3.0  # loss: approved as it is


def test_an_update_over_several_steps_is_released_from_where_the_client_left_it(tmp_path):
    plan = step_plan()
    fp = plan.variants[0].id
    w, _ = virtual(tmp_path, rules('outputs.new_w = { update = "w" }', fp), np.float32([1, 2]))
    (x,) = w.search()
    weights = w.put(np.float32([10, 20]), key="weights")
    for _ in range(3):  # in place: each step reads the previous step's (private) weights
        run_step(w, plan, weights, x, np.float32(0.5), outputs=["weights", "loss"])
    assert w.fetch_arrays(["weights"], keep=True)[0].tolist() == [1.5, 3.0]  # 3 * 0.5 * x, not the weights


def test_the_update_is_clipped_and_noised_once_with_the_named_noise(tmp_path):
    plan = step_plan()
    fp = plan.variants[0].id
    n, clip, sigma = 20_000, 2.0, 0.5
    secret = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    text = rules('outputs.new_w = { update = "w" }\nupdate = { clip_norm = 2.0, noise_multiplier = 0.5 }', fp)
    w, audit = virtual(tmp_path, text, secret)
    (x,) = w.search()
    run_step(w, plan, np.zeros(n, np.float32), x, np.float32(1.0), outputs=["w", "loss"])
    released = w.fetch_arrays(["w"], keep=True)[0].astype(np.float64)
    clipped = secret.astype(np.float64) * clip / np.linalg.norm(secret)
    noise = released - clipped
    # Gaussian noise of std sigma * clip on every coordinate: 20k samples pin mean and std to within 5 sigma
    assert abs(noise.mean()) < 5 * sigma * clip / np.sqrt(n)
    assert abs(noise.std() / (sigma * clip) - 1) < 5 / np.sqrt(2 * n)
    assert np.array_equal(w.fetch_arrays(["w"], keep=True)[0], released.astype(np.float32))  # noised once
    line = audit_lines(audit)[-1]
    assert line["event"] == "released" and line["noise_multiplier"] == sigma and line["clip_norm"] == clip
    assert line["epsilon"] > 0 and line["delta"] == 1e-5


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('[[plan]]\nfingerprint = "abc"\noutputs.y = "as_is"', "fingerprint must be the plan's sha256"),
        (rules('outputs.y = "copy"', "a" * 64), 'expected "as_is" or { update'),
        (rules('outputs.y = "as_is"\nupdate = { clip_norm = 1.0 }', "a" * 64), "no output is released"),
        (
            rules('outputs.y = { update = "w" }\nupdate = { noise_multiplier = 1.0 }', "a" * 64),
            "needs update.clip_norm",
        ),
        (rules('outputs.y = "as_is"\nmin_batch = -1', "a" * 64), "min_batch must be a whole number"),
        ("plans = 1", "unknown top-level keys ['plans']"),
        ("max_epsilon = 0", "max_epsilon must be positive"),
    ],
)
def test_a_broken_policy_says_what_is_wrong(tmp_path, text, error):
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=str(path)) as info:
        load(path)
    assert error in str(info.value)


def test_review_shows_dependencies_and_a_snippet_that_approves_the_plan():
    data = step_plan().variants[0].data
    r = review(data)
    assert r.deps == [["w", "x", "lr"], ["x"]]
    text = format_review(r, private={"x"})
    assert r.fingerprint in text and "PRIVATE-DERIVED from x" in text and "Add 1" in text
    import tomllib

    policy = parse(tomllib.loads(policy_snippet(r).replace("min_batch = 16", "min_batch = 1")))
    assert set(policy.rules[r.fingerprint].outputs) == {"new_w", "loss"}


@pytest.mark.parametrize("kind", KINDS)
def test_plan_worker_policy_audit_and_sighup_reload(tmp_path, kind):
    if kind == "node" and (reason := node_missing()):
        pytest.skip(reason)
    data = tmp_path / "secret.npy"
    np.save(data, np.float32([5, 6]))
    fp = copy_plan().variants[0].id
    policy = tmp_path / "policy.toml"
    policy.write_text(rules('outputs.y = "as_is"', "0" * 64))
    audit = tmp_path / "audit.jsonl"
    extra = ["--policy", str(policy), "--audit", str(audit), "--plans-dir", str(tmp_path / "plans")]
    with start(kind, "policy", data=[f"{data}:secret"], extra=extra) as proc, planwire.connect(proc.url) as c:
        (x,) = c.search("secret")
        with pytest.raises(PrivateDataError):
            c.plan_pointer(copy_plan())(x).get()
        assert (tmp_path / "plans" / f"{fp}.onnx").read_bytes() == copy_plan().variants[0].data  # kept for review
        done = subprocess.run(
            [sys.executable, "-m", "planwire.worker", "review", fp[:16], "--plans-dir", str(tmp_path / "plans")],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert f"fingerprint {fp}" in done.stdout and "PRIVATE-DERIVED from x" in done.stdout
        assert f'fingerprint = "{fp}"' in done.stdout and 'outputs."y" = "as_is"' in done.stdout
        policy.write_text("not toml [")
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "policy not reloaded")
        assert "not valid TOML" in proc.log()
        policy.write_text(rules('outputs.y = "as_is"', fp))
        proc.proc.send_signal(signal.SIGHUP)
        _wait_for(proc, "reloaded: 1 approved plans")
        assert c.plan_pointer(copy_plan())(x).get().tolist() == [5.0, 6.0]
    events = [line["event"] for line in audit_lines(audit)]
    assert events == ["refused", "released"]


def _wait_for(proc: WorkerProcess, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log():
        assert time.monotonic() < deadline, proc.log()
        time.sleep(0.05)


def test_max_epsilon_composes_every_clients_releases_from_a_running_total():
    """Many clients: the budget composes all of them (the Releaser keeps a running total, not a sum over
    clients per release), a refusal says so, and the total restored from a journal is the same."""
    from planwire.transport.errors import ProtocolError
    from planwire.worker.policy import Policy, Release, Rule
    from planwire.worker.release import Pending, Releaser, epsilon_of
    from planwire.worker.store import Entry

    noise = 2.0
    rule = Rule("f" * 64, "step", {"w": Release("update", "w")}, clip_norm=1.0, noise_multiplier=noise)
    allowed = 300  # noised releases the budget allows, all clients together
    budget = (epsilon_of({noise: allowed}, 1e-5) + epsilon_of({noise: allowed + 1}, 1e-5)) / 2
    releaser = Releaser(Policy({rule.fingerprint: rule}, max_epsilon=budget))

    def entry() -> Entry:
        base = np.zeros(3, np.float32)
        return Entry(np.ones(3, np.float32), private=True, pending=Pending(rule, "w", rule.outputs["w"], base, 1))

    clients = [f"k:{i:04d}".encode() for i in range(200)]
    for i in range(allowed):
        releaser.release(clients[i % len(clients)], f"w{i}", entry())
    with pytest.raises(ProtocolError, match="all clients' noised releases.*max_epsilon"):
        releaser.release(b"k:new", "w", entry())  # a fresh client gets no fresh budget
    spent = releaser.spent()
    assert len(spent) == len(clients)
    assert sum(releaser._total.values()) == allowed

    again = Releaser(Policy({rule.fingerprint: rule}, max_epsilon=budget))
    again.restore({c: {noise: 2 if i < allowed - len(clients) else 1} for i, c in enumerate(clients)})
    assert again._total == releaser._total
    with pytest.raises(ProtocolError, match="max_epsilon"):
        again.release(clients[0], "w", entry())
