"""Prometheus metrics of one worker (``plan-worker --metrics HOST:PORT``), in its own CollectorRegistry.

Stats updates them as requests are answered; prometheus_client serves the text format from its own thread.
Labels are bounded: request types and error codes are protocol enums; plans are labelled by name and id.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, start_http_server

# Run time buckets (seconds): a tiny plan takes tens of microseconds, a training step seconds.
RUN_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The worker's metrics; ``serve`` exposes them over HTTP."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "planwire_requests",
            "Requests answered, by type and error code ('' = success)",
            ["type", "code"],
            registry=r,
        )
        self.runs = Counter("planwire_runs", "Plan runs, by plan", ["plan", "plan_id"], registry=r)
        self.runs_failed = Counter(
            "planwire_runs_failed", "Plan runs refused or failed, by plan", ["plan", "plan_id"], registry=r
        )
        self.run_seconds = Histogram(
            "planwire_run_duration_seconds", "Time to answer a run request", buckets=RUN_BUCKETS, registry=r
        )
        self.private_releases = Counter(
            "planwire_private_releases", "Tensors of the worker's own data sent to a client (get)", registry=r
        )
        self.tensors = Gauge("planwire_tensors", "Tensors stored (the worker's own included)", registry=r)
        self.tensor_bytes = Gauge("planwire_tensor_bytes", "Bytes of tensors stored", registry=r)
        self.plans = Gauge("planwire_plans", "Plans registered", registry=r)
        self.plan_bytes = Gauge("planwire_plan_bytes", "Bytes of registered plans", registry=r)
        self.clients = Gauge("planwire_clients", "Clients seen since start", registry=r)
        self._request_children: dict[tuple[str, str], Counter] = {}

    def request(self, kind: str, code: str) -> None:
        child = self._request_children.get((kind, code))
        if child is None:
            child = self._request_children[kind, code] = self.requests.labels(kind, code)
        child.inc()

    def run(self, plan: str, plan_id: str, seconds: float, failed: bool) -> None:
        self.runs.labels(plan, plan_id).inc()
        if failed:
            self.runs_failed.labels(plan, plan_id).inc()
        self.run_seconds.observe(seconds)

    def track_holdings(self, **read: Callable[[], float]) -> None:
        """Read the gauges (tensors, tensor_bytes, plans, plan_bytes, clients) when scraped, not per request."""
        for name, fn in read.items():
            getattr(self, name).set_function(fn)

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on HOST:PORT from a daemon thread; returns the bound port (PORT 0: any free)."""
        disable_created_metrics()  # no *_created series: this process is a worker, the switch is global
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]
