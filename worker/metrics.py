"""Prometheus metrics of one worker (``plan-worker --metrics HOST:PORT``), in its own CollectorRegistry.

Stats counts requests and runs in plain ints on the serving thread (a prometheus_client ``inc``/``observe``
takes a lock and a label lookup: several microseconds per request, a tiny call's budget); a custom collector
turns them into metric families when ``/metrics`` is scraped, from prometheus_client's own thread. Its reads
are copies of dicts and lists of ints, each atomic under the GIL, so a scrape never sees a torn row.
Labels are bounded: request types and error codes are protocol enums; plans are labelled by name and id.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# Run time buckets (seconds): a tiny plan takes tens of microseconds, a training step seconds.
RUN_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The worker's metrics; ``serve`` exposes them over HTTP. ``request`` and ``run`` are called once per
    answered request on the serving thread and only add to plain counters."""

    def __init__(self, before_collect: Callable[[], None] | None = None) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.before_collect = before_collect  # brings the counters up to date (Stats.settle) before a scrape
        self.requests: dict[tuple[str, str], int] = {}  # (type, error code or '') -> answered
        self.runs: dict[tuple[str, str], list[int]] = {}  # (plan name, plan id) -> [runs, failed]
        self.run_buckets = [0] * (len(RUN_BUCKETS) + 1)  # per bucket (not cumulative), the last: +Inf
        self.run_seconds = 0.0
        self.private_releases = 0
        r.register(_Collector(self))
        self.tensors = Gauge("planwire_tensors", "Tensors stored (the worker's own included)", registry=r)
        self.tensor_bytes = Gauge("planwire_tensor_bytes", "Bytes of tensors stored", registry=r)
        self.plans = Gauge("planwire_plans", "Plans registered", registry=r)
        self.plan_bytes = Gauge("planwire_plan_bytes", "Bytes of registered plans", registry=r)
        self.clients = Gauge("planwire_clients", "Clients seen since start", registry=r)

    def request(self, kind: str, code: str, n: int = 1) -> None:
        key = (kind, code)
        self.requests[key] = self.requests.get(key, 0) + n

    def run(self, plan: str, plan_id: str, seconds: float, failed: bool) -> None:
        self.ran(plan, plan_id, 1, failed)
        self.timed((seconds,))

    def ran(self, plan: str, plan_id: str, n: int, failed: int = 0) -> None:
        """``n`` runs of one plan, ``failed`` of them refused or failed (their durations: :meth:`timed`)."""
        row = self.runs.get((plan, plan_id))
        if row is None:
            row = self.runs[plan, plan_id] = [0, 0]
        row[0] += n
        row[1] += failed

    def timed(self, seconds: Iterable[float]) -> None:
        """The durations of runs, in the order they ran (the sum is added in that order)."""
        buckets, total = self.run_buckets, self.run_seconds
        for s in seconds:
            buckets[bisect_left(RUN_BUCKETS, s)] += 1  # le: a value on a bound is in its bucket
            total += s
        self.run_seconds = total

    def released(self) -> None:
        """One tensor of the worker's own data was sent to a client."""
        self.private_releases += 1

    def track_holdings(self, **read: Callable[[], float]) -> None:
        """Read the gauges (tensors, tensor_bytes, plans, plan_bytes, clients) when scraped, not per request."""
        for name, fn in read.items():
            getattr(self, name).set_function(fn)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on HOST:PORT from a daemon thread; returns the bound port (PORT 0: any free)."""
        disable_created_metrics()  # no *_created series: this process is a worker, the switch is global
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]


class _Collector:
    """The counters and the run-time histogram of ``Metrics``, as metric families (read when scraped)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        mt = self.metrics
        if mt.before_collect is not None:
            mt.before_collect()
        requests = CounterMetricFamily(
            "planwire_requests", "Requests answered, by type and error code ('' = success)", labels=["type", "code"]
        )
        for (kind, code), n in sorted(dict(mt.requests).items()):
            requests.add_metric([kind, code], n)
        yield requests
        rows = sorted((k, tuple(v)) for k, v in dict(mt.runs).items())
        runs = CounterMetricFamily("planwire_runs", "Plan runs, by plan", labels=["plan", "plan_id"])
        failed = CounterMetricFamily(
            "planwire_runs_failed", "Plan runs refused or failed, by plan", labels=["plan", "plan_id"]
        )
        for labels, (n, bad) in rows:
            runs.add_metric(list(labels), n)
            if bad:  # as a labelled Counter: a plan's failed series appears at its first failure
                failed.add_metric(list(labels), bad)
        yield runs
        yield failed
        counts, total, cumulative, buckets = list(mt.run_buckets), mt.run_seconds, 0, []
        for bound, n in zip((*RUN_BUCKETS, float("inf")), counts, strict=True):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        yield HistogramMetricFamily(
            "planwire_run_duration_seconds", "Time to answer a run request", buckets=buckets, sum_value=total
        )
        yield CounterMetricFamily(
            "planwire_private_releases",
            "Tensors of the worker's own data sent to a client (get)",
            value=mt.private_releases,
        )
