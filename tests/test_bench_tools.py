"""The benchmark's own machinery: aggregation over runs (medians, spread, majority verdicts), the report,
labels that keep derived figures out of targets, and the like-for-like echo server (a real process)."""

from __future__ import annotations

import sys
from pathlib import Path

import psutil
import pytest
import zmq

from bench import aggregate, report
from bench.echo import FETCH, REPLAY, STORE
from bench.env import spawn_ready, stop_process
from bench.timing import Report, Target
from planwire.transport.sockets import configure, recv_frames, send_frames


def run_with(value: float, latency_us: float) -> dict:
    r = Report()
    r.time("latency", "call", [latency_us / 1e6] * 3, "us")
    r.count("communication", "rpc messages", 2, "msgs", kind="derived")
    r.target("ratio", value, "<=", 1.5, "x", "a / b")
    r.target("by design", 100.0, "", None, "x", "n / 1", kind="by construction", basis="100 round trips")
    return r.to_json()


def test_aggregate_takes_medians_spread_and_majority_verdicts() -> None:
    runs = [run_with(1.4, 100), run_with(1.6, 130), run_with(1.45, 110)]
    agg = aggregate.aggregate(runs, names=["a.json", "b.json", "c.json"])
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


def test_report_labels_targets_and_keeps_derived_figures_apart() -> None:
    agg = aggregate.aggregate([run_with(1.4, 100), run_with(1.6, 130), run_with(1.45, 110)], names=["a", "b", "c"])
    text = report.markdown(agg, all_figures=True)
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
