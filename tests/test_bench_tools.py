"""The benchmark's own machinery: aggregation over runs (medians, spread, majority verdicts), the report,
labels that keep derived figures out of targets, and the like-for-like echo server (a real process)."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import zmq

from bench import aggregate, report, sampling, timing
from bench.echo import FETCH, REPLAY, STORE
from bench.env import spawn_ready, stop_process
from bench.timing import Case, Report, Target
from planwire.transport.sockets import configure, recv_frames, send_frames


def run_with(value: float, latency_us: float) -> dict:
    r = Report()
    r.time("latency", "call", [latency_us / 1e6] * 3, "us")
    r.count("communication", "rpc messages", 2, "msgs", kind="derived")
    r.target("ratio", value, "<=", 1.5, "x", "a / b").ci95 = [value - 0.02, value + 0.02]  # clear of 1.5
    r.target("by design", 100.0, "", None, "x", "n / 1", kind="by construction", basis="100 round trips")
    return r.to_json()


@pytest.fixture
def three_runs() -> dict:
    """Three runs of one target (<= 1.5x): 1.4 and 1.45 pass, 1.6 fails (intervals +-0.02: all settled)."""
    runs = [run_with(1.4, 100), run_with(1.6, 130), run_with(1.45, 110)]
    return aggregate.aggregate(runs, names=["a.json", "b.json", "c.json"])


def test_aggregate_takes_medians_spread_and_majority_verdicts(three_runs: dict) -> None:
    agg = three_runs
    call = agg["figures"]["latency"]["call"]
    assert (call["median"], call["min"], call["max"]) == pytest.approx((110, 100, 130))
    assert call["samples_per_run"] == [3, 3, 3] and call["kind"] == "measured"
    assert agg["figures"]["communication"]["rpc messages"]["kind"] == "derived"
    (ratio, design) = agg["targets"]
    assert ratio["median"] == pytest.approx(1.45) and ratio["values"] == [1.4, 1.6, 1.45]
    assert (ratio["passes"], ratio["passed"], ratio["verdict"]) == (2, True, "flaky")
    assert "passes" not in design and design["kind"] == "by construction"
    two = aggregate.aggregate([run_with(1.4, 1), run_with(1.6, 1)])
    assert (two["targets"][0]["passed"], two["targets"][0]["verdict"]) == (False, "flaky")  # 1 of 2: no majority
    assert [aggregate.verdict(p, 3) for p in (0, 3)] == ["fail", "pass"]


def test_report_labels_targets_and_keeps_derived_figures_apart(three_runs: dict) -> None:
    text = report.markdown(three_runs, all_figures=True)
    assert "| ratio | 1.45× (1.40–1.60) | ≤ 1.50× | 2 of 3 | flaky (pass by majority) |" in text
    assert "| by design | 100× | by construction: 100 round trips |" in text
    figures = text.split("| Figure |")[1].split("| Not a measurement")[0]
    assert "latency: call | 110 µs (100–130) | 3 |" in figures and "rpc messages" not in figures


def test_each_familys_wall_time_is_kept_aggregated_and_reported() -> None:
    runs = []
    for seconds in (100.0, 140.0, 120.0):
        r = run_with(1.4, 100)
        r["family_s"], r["duration_s"] = {"latency": seconds, "build": seconds / 4}, seconds * 1.25
        runs.append(r)
    agg = aggregate.aggregate(runs + [run_with(1.4, 100) | {"duration_s": 150.0}])  # an older run: no family_s
    assert agg["family_s"]["latency"]["values"] == [100.0, 140.0, 120.0]
    assert (agg["family_s"]["build"]["median"], agg["family_s"]["build"]["max"]) == (30.0, 35.0)
    line = "Wall time of a run: 150 s (125–175); by family (s, median): latency 120, build 30.0."
    assert line in report.markdown(agg)
    one = Report()
    one.family_s = {"latency": 61.25, "training_models": 250.0}
    lines = ["## wall time by family (311 s in all)", f"{'latency':20}    61.2 s", f"{'training_models':20}   250.0 s"]
    assert "\n".join(lines) in one.table()


def test_the_node_family_is_a_table_with_a_column_per_worker() -> None:
    from bench import node

    r = Report()
    for side, us in (("python", 130), ("node", 150), ("echo", 110)):
        r.time(node.FAMILY, node.TINY.format(node.SIDES[side]), [us / 1e6] * 3, "us")
    r.rate(node.FAMILY, node.PIPELINED.format(node.SIDES["node"]), [0.5], 10_000, "calls/s")
    text = report.markdown(aggregate.aggregate([r.to_json()]))
    table = text.split("| Figure (bench.node) |")[1]
    assert table.startswith(" Python plan-worker | Node.js plan-worker | raw pyzmq echo |")
    assert "| tiny call (run with fetch) | 130 µs | 150 µs | 110 µs |" in table
    assert "| pipelined tiny calls | – | 20,000 calls/s | – |" in table  # not measured, or not for the echo
    assert "| 64 MiB put+get (echo: store+fetch) | – | – | – |" in table


def test_the_node_table_has_as_many_columns_as_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import node

    monkeypatch.setattr(node, "SIDES", {**node.SIDES, "jsecho": node.LABELS["jsecho"]})
    r = Report()
    r.time(node.FAMILY, node.TINY.format(node.SIDES["jsecho"]), [90e-6] * 3, "us")
    table = report.markdown(aggregate.aggregate([r.to_json()])).split("| Figure (bench.node) |")[1].splitlines()
    assert table[0].endswith("| raw pyzmq echo | raw zeromq.js echo |")
    assert table[1] == "|---|---|---|---|---|"  # the separator follows the sides
    assert "| tiny call (run with fetch) | – | – | – | – |" in table  # jsecho is not in ROWS' sides


def test_derived_figures_cannot_be_targets() -> None:
    with pytest.raises(ValueError, match="a derived figure cannot be a target"):
        Target("msgs", 2.0, ">=", 1.0, "msgs", "2 per call", kind="derived")


def test_readme_section_is_rewritten_between_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{report.BEGIN}\nold table\n{report.END}\nafter\n")
    report.write_readme("| new |", readme)
    assert readme.read_text() == f"# x\nbefore\n{report.BEGIN}\n| new |\n{report.END}\nafter\n"


@pytest.mark.parametrize("hop", [False, True])
def test_echo_server_replays_stores_and_fetches(tmp_path: Path, hop: bool) -> None:
    """The plain echo, and the one whose messages cross to a child process and back (--hop): same answers."""
    flags = ["--hop"] if hop else []
    proc, line = spawn_ready([sys.executable, "-m", "bench.echo", *flags, f"ipc://{tmp_path}/echo.ipc"], 60)
    child = psutil.Process(proc.pid).children()
    assert len(child) == (1 if hop else 0)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        configure(sock)
        sock.setsockopt(zmq.RCVTIMEO, 30_000)
        sock.connect(line.removeprefix("ready on "))

        def round_trip(frames: list[bytes]) -> list[bytes]:
            send_frames(sock, frames)
            return [bytes(f) for f in recv_frames(sock)]

        assert round_trip([b"a", b"bc"]) == [b"a", b"bc"]  # plain echo
        assert round_trip([REPLAY, b"reply", b"x" * 64]) == [REPLAY]
        assert round_trip([b"request"]) == [b"reply", b"x" * 64]  # every later message gets the set reply
        assert round_trip([b"request", b""]) == [b"reply", b"x" * 64]
        payload = bytes(range(256)) * 4096
        assert round_trip([STORE, payload]) == [STORE]
        assert round_trip([FETCH]) == [payload]
    finally:
        sock.close(0)
        ctx.term()
        stop_process(proc)
    for c in child:  # the hop's child ends with its server
        c.wait(30)


class FakeClock:
    """A clock that moves only when a case runs: sampled cases cost exactly what the test says."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def case(self, cost: Callable[[], float]) -> Callable[[], None]:
        def run() -> None:
            self.now += cost()

        return run


def test_rounds_stop_once_the_ratio_is_tight(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(sampling.time, "perf_counter", clock)
    rng = np.random.default_rng(1)
    steady = [Case("a", clock.case(lambda: 1e-3 * (1 + 0.01 * rng.random())), 10, 0)]
    steady.append(Case("b", clock.case(lambda: 2e-3 * (1 + 0.01 * rng.random())), 10, 0))
    got = sampling.interleaved(steady, rounds=50, budget_s=1e9, min_rounds=6, watch=[("a", "b")])
    assert got["a"].stop == "converged" and got["a"].n_rounds == 6 and len(got["a"]) == 60  # the floor
    assert got["a"].round_of[:12] == [0] * 10 + [1, 1]


@pytest.mark.parametrize(("rounds", "budget_s", "stop"), [(12, 1e9, "cap"), (1000, 0.05, "budget")])
def test_rounds_that_never_get_tight_end_at_the_cap_or_the_budget(monkeypatch, rounds, budget_s, stop) -> None:
    """A side that varies several-fold from one round to the next is not within +-5% in 12 rounds: the cap
    or the time budget ends it, whichever comes first (never before the floor)."""
    clock = FakeClock()
    monkeypatch.setattr(sampling.time, "perf_counter", clock)
    rng = np.random.default_rng(1)
    noisy = [Case("a", clock.case(lambda: 1e-3 * rng.lognormal(0, 1)), 1, 0), Case("b", clock.case(lambda: 1e-3), 1, 0)]
    got = sampling.interleaved(noisy, rounds=rounds, budget_s=budget_s, min_rounds=3, watch=[("a", "b")])
    assert got["a"].stop == stop and 3 <= got["a"].n_rounds <= min(rounds, 1000)
    assert got["a"].n_rounds == 12 if stop == "cap" else got["a"].n_rounds < 1000
    assert sampling.halfwidth(got["a"], got["b"]) > sampling.TOL


def test_intervals_are_looked_at_only_on_planned_rounds(monkeypatch) -> None:
    """The floor, its doublings and the cap: a ratio that gets tight at round 7 stops at round 8, not 7."""
    assert sampling.looks(5, 40) == {5, 10, 20, 40} and sampling.looks(4, 12) == {4, 8, 12}
    clock = FakeClock()
    monkeypatch.setattr(sampling.time, "perf_counter", clock)
    seen: list[int] = []
    real = sampling.halfwidth

    def spy(a, b=None):  # noqa: ANN001, ANN202
        seen.append(a.n_rounds)
        return real(a, b)

    monkeypatch.setattr(sampling, "halfwidth", spy)
    rng = np.random.default_rng(3)
    cases = [Case("a", clock.case(lambda: 1e-3 * (1 + 0.3 * rng.random())), 5, 0)]
    cases.append(Case("b", clock.case(lambda: 1e-3), 5, 0))
    got = sampling.interleaved(cases, rounds=40, budget_s=1e9, min_rounds=4, watch=[("a", "b")])
    assert set(seen) <= {4, 8, 16, 32, 40} and got["a"].n_rounds in {4, 8, 16, 32, 40}


@pytest.mark.parametrize(
    ("op", "ci", "want"),
    [("<=", [1.2, 1.45], "pass"), ("<=", [1.3, 1.7], "unsettled"), ("<=", [1.55, 1.9], "fail"),
     (">=", [4.5, 6.0], "pass"), (">=", [3.5, 4.5], "unsettled"), ("<=", None, "unsettled")],
)  # fmt: skip
def test_a_target_whose_interval_straddles_it_is_unsettled_not_passed(op: str, ci: list | None, want: str) -> None:
    value, target = (1.4, 1.5) if op == "<=" else (5.0, 4.0)
    if want == "fail":
        value = 1.7
    elif want == "unsettled" and op == ">=":
        value = 4.2
    assert timing.outcome(value, op, target, ci) == want


def test_a_measured_target_without_an_interval_is_unsettled_unless_an_exact_count() -> None:
    # the flower client RSS of a kept run: one reading of 0.47 against <= 0.5 was called a pass
    assert timing.outcome(0.4716, "<=", 0.5, None) == "unsettled"
    assert timing.outcome(0.4716, "<=", 0.5, []) == "unsettled"
    assert [timing.outcome(v, "<=", 0, None, exact=True) for v in (0, 3)] == ["pass", "fail"]
    assert timing.outcome(8, ">=", 8, None, exact=True) == "pass"
    r = Report()
    r.target("rss", 0.47, "<=", 0.5, "x", "one reading")
    r.target("calls lost", 0, "<=", 0, "calls", "counted", exact=True)
    assert [t["outcome"] for t in r.to_json()["targets"]] == ["unsettled", "pass"]
    assert [t["exact"] for t in r.to_json()["targets"]] == [False, True]
    agg = aggregate.aggregate([r.to_json()] * 3)
    assert [(t["verdict"], t["passed"]) for t in agg["targets"]] == [("unsettled", False), ("pass", True)]
    assert "PASS" not in r.table().split("rss")[0].splitlines()[-1]


def test_figure_targets_carry_the_figures_interval() -> None:
    r = Report()
    r.values("footprint", "rss", [70.0, 71.0, 72.0, 73.0, 74.0, 75.0, 76.0], "MB")
    fig = r.get("footprint", "rss")
    assert fig.median == 73.0 and fig.ci95[0] <= 73.0 <= fig.ci95[1] and fig.runs == 7
    assert timing.outcome(*(lambda t: (t.value, t.op, t.target, t.ci95))(r.on_figure("far", ("footprint", "rss"),
                          "<=", 150, basis="alone"))) == "pass"  # fmt: skip
    near = r.on_figure("near", ("footprint", "rss"), "<=", 73.5, basis="alone")
    assert timing.outcome(near.value, near.op, near.target, near.ci95) == "unsettled"


@pytest.mark.parametrize(
    ("passes", "runs", "unsettled", "want"),
    [(0, 3, 1, "fail"),  # fail, fail, unsettled: a majority of settled fails is FAIL (was "unsettled")
     (2, 3, 1, "pass"),  # pass, pass, unsettled: no fail, a majority of settled passes (was "flaky")
     (1, 3, 1, "flaky"),  # pass, fail, unsettled: settled runs disagree (was "unsettled")
     (1, 4, 2, "flaky"),  # pass, fail, unsettled, unsettled: settled runs disagree (was "unsettled")
     (0, 5, 2, "fail")],  # 3 settled fails of 5 (was "unsettled")
)  # fmt: skip
def test_verdict_rules(passes: int, runs: int, unsettled: int, want: str) -> None:
    assert aggregate.verdict(passes, runs, unsettled) == want


def test_verdicts_over_runs_with_unsettled_runs_are_reported_with_their_count() -> None:
    def runs_of(cis: list) -> dict:
        runs = []
        for value, ci in cis:
            r = Report()
            r.target("ratio", value, "<=", 1.5, "x", "a / b").ci95 = ci
            runs.append(r.to_json())
        return aggregate.aggregate(runs)

    failing = runs_of([(1.7, [1.6, 1.8]), (1.7, [1.6, 1.8]), (1.5, [1.3, 1.7])])
    assert (failing["targets"][0]["verdict"], failing["targets"][0]["fails"]) == ("fail", 2)
    assert "| 0 of 3 | FAIL (unsettled in 1 of 3) |" in report.markdown(failing)
    passing = runs_of([(1.4, [1.3, 1.45]), (1.4, [1.3, 1.45]), (1.5, [1.3, 1.7])])
    assert (passing["targets"][0]["verdict"], passing["targets"][0]["passed"]) == ("pass", True)
    assert "| 2 of 3 | pass (unsettled in 1 of 3) |" in report.markdown(passing)
    split = runs_of([(1.4, [1.3, 1.45]), (1.7, [1.6, 1.8]), (1.5, [1.3, 1.7])])
    assert "| 1 of 3 | flaky (no majority) |" in report.markdown(split)


def test_an_unsettled_target_is_not_called_passed_over_runs() -> None:
    runs = []
    for ci in ([1.2, 1.45], [1.3, 1.7], [1.35, 1.6]):  # one settled pass, two intervals straddling 1.5
        r = Report()
        t = r.target("ratio", 1.4, "<=", 1.5, "x", "a / b")
        t.ci95 = ci
        runs.append(r.to_json())
    assert [t["outcome"] for run in runs for t in run["targets"]] == ["pass", "unsettled", "unsettled"]
    (entry,) = aggregate.aggregate(runs)["targets"]
    assert (entry["passes"], entry["passed"], entry["verdict"]) == (1, False, "unsettled")
    text = report.markdown(aggregate.aggregate(runs))
    assert "| 1 of 3 | unsettled (no settled majority: unsettled in 2 of 3) |" in text


def test_figures_and_ratios_keep_their_interval_samples_and_stop(monkeypatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(sampling.time, "perf_counter", clock)
    rng = np.random.default_rng(2)
    cases = [Case("x", clock.case(lambda: 1e-3 * (1 + 0.2 * rng.random())), 5, 0)]
    cases.append(Case("y", clock.case(lambda: 3e-3 * (1 + 0.2 * rng.random())), 5, 0))
    got = sampling.interleaved(cases, rounds=40, budget_s=1e9, min_rounds=5, watch=[("y", "x")])
    r = Report()
    x = r.time("f", "x", got["x"], "ms")
    r.time("f", "y", got["y"], "ms")
    per_step = r.time("f", "x per step", got["x"].scaled(0.5), "ms")
    assert x.ci95[0] <= x.median <= x.ci95[1] and x.rounds == got["x"].n_rounds and x.stop == "converged"
    assert per_step.ci95 == pytest.approx([c / 2 for c in x.ci95]) and per_step.runs == x.runs
    t = r.ratio("y/x", ("f", "y"), ("f", "x"), "<=", 5.0)
    assert t.ci95[0] <= t.value <= t.ci95[1] and t.ci95[1] / t.value - 1 <= 0.06
    assert t.samples == [len(got["y"]), len(got["x"])] and t.stop == "converged"
    best = r.same_as("f", "x best", "x", note="the faster")
    assert r.ratio("y/best", ("f", "y"), ("f", "x best")).ci95 == t.ci95 and best.note == "the faster"
    rate = r.rate("f", "x rate", got["x"], 1000, "calls/s")
    assert rate.ci95[0] <= rate.median <= rate.ci95[1]
    plain = r.time("f", "plain list", [1e-3, 2e-3, 3e-3], "ms")  # not sampled in rounds: no interval claimed
    assert plain.ci95 is None and r.ratio("p/x", ("f", "plain list"), ("f", "x")).ci95 is None
    json.dumps(r.to_json())  # intervals, rounds and stops are written to the run file

    agg = aggregate.aggregate([r.to_json(), r.to_json()])
    assert agg["figures"]["f"]["x"]["ci95_per_run"] == [x.ci95, x.ci95]
    assert agg["figures"]["f"]["x"]["stop_per_run"] == ["converged", "converged"]
    (entry,) = [e for e in agg["targets"] if e["name"] == "y/x"]
    assert entry["samples_per_run"] == [t.samples, t.samples] and entry["ci95_per_run"] == [t.ci95, t.ci95]
    text = report.markdown(agg)
    row = f"| y/x | {t.samples[0]}/{t.samples[1]}, {t.samples[0]}/{t.samples[1]} |"
    assert row in text and "| converged, converged |" in text


def test_runs_kept_before_the_interval_rule_still_aggregate_and_report() -> None:
    olds = [run_with(1.4, 100), run_with(1.6, 120)]
    for old in olds:
        for figs in old["figures"].values():
            for fig in figs.values():
                for key in ("ci95", "rounds", "stop"):
                    fig.pop(key)
        for t in old["targets"]:
            for key in ("ci95", "samples", "stop", "exact", "outcome"):
                t.pop(key)
    agg = aggregate.aggregate(olds)
    assert "ci95_per_run" not in agg["figures"]["latency"]["call"]
    assert "95% interval of the ratio" not in report.markdown(agg)
    assert agg["targets"][0]["verdict"] == "unsettled"  # no interval, not marked exact: their values do not decide
    for path in sorted((Path(__file__).parent.parent / "bench" / "runs").glob("*.json")):
        assert report.markdown(aggregate.aggregate([aggregate.load(path)]))  # the kept runs


def test_processes_started_ahead_are_the_ones_handed_out_and_their_failure_is_raised() -> None:
    from bench.env import Env

    with Env() as env:
        env.prestart({"node"})  # the node family asks for the echo servers (both schedulings)
        sock = env.echo("tcp", True, "t")  # waits for the background start, then reuses its server
        assert sorted(env._echo) == [(False, False), (True, False)] and env._prestart is None
        send_frames(sock, [REPLAY, b"r"])
        assert [bytes(f) for f in recv_frames(sock)] == [REPLAY]
        pids = {env.echo_pid(tuned=True), env.echo_pid(tuned=False)}  # the servers prestarted, none new
        assert pids == {p.pid for p in env._echo.values()} and len(pids) == 2 and len(env._echo) == 2

    with Env() as env:
        real = env._echo_server

        def broken(tuned: bool, hop: bool) -> None:  # fails in the background start only
            if threading.current_thread().name == "bench-prestart":
                raise RuntimeError("echo server would not start")
            real(tuned, hop)

        env._echo_server = broken  # type: ignore[method-assign]
        env.prestart({"node"})
        with pytest.raises(RuntimeError, match="would not start"):
            env.echo("tcp")


def test_the_runs_of_a_batch_share_one_exports_directory_removed_at_the_end(monkeypatch, tmp_path: Path) -> None:
    """training_models' hand-on between the runs of one ``--runs N``: every run gets the same directory."""
    import bench.__main__ as cli
    from bench.training_models import BATCH_EXPORTS

    seen: list[str] = []
    real = cli.subprocess.run  # the module is shared: only the runs' children are faked

    def fake_run(cmd: list[str], **kw: Any) -> Any:
        if "--single" not in cmd:
            return real(cmd, **kw)
        env = kw["env"]
        seen.append(env[BATCH_EXPORTS])
        assert Path(env[BATCH_EXPORTS]).is_dir()
        out = Path(cmd[cmd.index("--single") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"batch": "b", **run_with(1.4, 100)}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    rc = cli.main(["--runs", "2", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "agg.json")])
    assert rc == 0 and len(seen) == 2 and seen[0] == seen[1] and not Path(seen[0]).exists()


def test_flower_round_time_target_has_an_interval_and_single_readings_stay_unsettled(monkeypatch) -> None:
    flower = pytest.importorskip("bench.flower")

    def variant(seconds: float, rss: float, acc: float) -> dict:
        return {
            "round_s": seconds, "round_samples_s": [seconds * (1 + 0.01 * i) for i in range(7)],
            "client_rss_mb": rss, "runtime_rss_mb": rss - 100, "sent_bytes_round1": 1, "sent_bytes_per_round": 1,
            "received_bytes_per_round": 1, "accuracy": acc, "accuracy_plateau": acc, "accuracy_by_round": [acc],
        }  # fmt: skip

    figures = {"floor": variant(0.1, 100, 0), "pytorch": variant(1.0, 400, 0.95), "planwire": variant(0.5, 190, 0.95)}
    monkeypatch.setattr(flower, "compare", lambda quick: {"nodes": 5, "rounds": 3, "figures": figures})
    r = Report()
    flower.run(None, r, quick=True)
    got = {t["name"]: t for t in r.to_json()["targets"]}
    rt = got["flower round time planwire/pytorch"]
    assert rt["ci95"] and rt["outcome"] == "pass" and rt["value"] == pytest.approx(0.515 / 1.03)
    assert got["flower client RSS planwire/pytorch"]["outcome"] == "unsettled"  # one reading: 0.475 <= 0.5
    assert got["flower accuracy gap, pytorch vs planwire (absolute)"]["outcome"] == "unsettled"


def test_profile_step_nchwc_rewrites_a_saved_graph_as_the_worker_does(tmp_path: Path, capsys) -> None:
    """``python -m bench.profile_step --nchwc SRC DST``: the saved graph's Convs as the worker rewrites them
    (worker/nchwc.py, its cases in tests/test_nchwc.py), its feeds copied beside it; the same results."""
    import onnxruntime as ort
    from onnx import TensorProto
    from onnx import helper as oh

    from bench.profile_step import feeds_path, main
    from planwire.worker.nchwc import DOMAIN, block

    c = 2 * block()
    nodes = [oh.make_node("Conv", ["x", "w0"], ["y0"], pads=[1] * 4), oh.make_node("Conv", ["y0", "w1"], ["y"])]
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 6, 6])]
    inputs += [
        oh.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in (("w0", [c, 3, 3, 3]), ("w1", [c, c, 1, 1]))
    ]
    graph = oh.make_graph(nodes, "convs", inputs, [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    src, dst = tmp_path / "a.onnx", tmp_path / "b.onnx"
    src.write_bytes(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]).SerializeToString())
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((2, 3, 6, 6), dtype=np.float32)}
    feeds |= {"w0": rng.standard_normal((c, 3, 3, 3), dtype=np.float32)}
    feeds |= {"w1": rng.standard_normal((c, c, 1, 1), dtype=np.float32)}
    np.savez(feeds_path(str(src)), **feeds)

    assert main(["--nchwc", str(src), str(dst)]) == 0
    assert capsys.readouterr().out.strip() == f"2 Convs rewritten (block {block()})"
    assert DOMAIN.encode() in dst.read_bytes()
    saved = dict(np.load(feeds_path(str(dst))))
    want, got = (
        ort.InferenceSession(p.read_bytes(), providers=["CPUExecutionProvider"]).run(None, saved)[0] for p in (src, dst)
    )
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
