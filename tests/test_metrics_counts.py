"""The worker's metrics: plain counters on the serving thread, exposed as Prometheus families when scraped."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from planwire.worker.metrics import Metrics


def _samples(mt: Metrics) -> dict:
    text = generate_latest(mt.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counts_and_histogram_read_at_scrape_time_as_prometheus_client_would():
    mt = Metrics()
    mt.request("run", "")
    mt.request("run", "")
    mt.request("get", "unknown_tensor")
    mt.run("tiny", "abcdef012345", 1e-4, False)  # on a bucket's bound: counted in that bucket (le)
    mt.run("tiny", "abcdef012345", 0.3, True)
    mt.run("other", "0123456789ab", 100.0, False)  # past the last bound: +Inf only
    mt.released()
    s = _samples(mt)
    assert s["planwire_requests_total", (("code", ""), ("type", "run"))] == 2
    assert s["planwire_requests_total", (("code", "unknown_tensor"), ("type", "get"))] == 1
    tiny, other = (("plan", "tiny"), ("plan_id", "abcdef012345")), (("plan", "other"), ("plan_id", "0123456789ab"))
    assert s["planwire_runs_total", tiny] == 2 and s["planwire_runs_total", other] == 1
    assert s["planwire_runs_failed_total", tiny] == 1
    assert ("planwire_runs_failed_total", other) not in s  # no failure yet: no series, as a labelled Counter
    assert s["planwire_run_duration_seconds_bucket", (("le", "0.0001"),)] == 1
    assert s["planwire_run_duration_seconds_bucket", (("le", "0.25"),)] == 1
    assert s["planwire_run_duration_seconds_bucket", (("le", "0.5"),)] == 2
    assert s["planwire_run_duration_seconds_bucket", (("le", "60.0"),)] == 2
    assert s["planwire_run_duration_seconds_bucket", (("le", "+Inf"),)] == 3
    assert s["planwire_run_duration_seconds_count", ()] == 3
    assert abs(s["planwire_run_duration_seconds_sum", ()] - 100.3001) < 1e-9
    assert s["planwire_private_releases_total", ()] == 1
    mt.run("tiny", "abcdef012345", 1e-3, False)  # a later scrape reads the counters again
    assert _samples(mt)["planwire_runs_total", tiny] == 3
