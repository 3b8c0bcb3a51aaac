"""The Prometheus metrics of ``peftkit serve``, in a CollectorRegistry of the app's own:
requests and rows by adapter and status, latency histograms (request, queue wait,
forward), rows and distinct adapters per forward, queue depth, resident adapters, adapter
loads with their time and failures."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from peftkit.serving.scheduler import ForwardStats, LoadStats, Scheduler

__all__ = ["ServeMetrics"]

BY = ["adapter", "status"]
LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ServeMetrics:
    """The app's Prometheus metrics, in a CollectorRegistry of its own."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = r = CollectorRegistry()
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

        def histogram(name: str, doc: str, buckets: tuple = LATENCY) -> Histogram:
            return Histogram(f"peftkit_{name}", doc, buckets=buckets, registry=r)

        self.requests = Counter("peftkit_requests", "classify requests", BY, registry=r)
        self.rows = Counter("peftkit_rows", "rows classified", BY, registry=r)
        self.loads = Counter("peftkit_adapter_loads", "adapter loads", ["status"], registry=r)
        self.total = histogram("request_seconds", "request latency")
        self.wait = histogram("queue_wait_seconds", "a row's wait for its forward")
        self.forward = histogram("forward_seconds", "forward time")
        self.load_time = histogram("adapter_load_seconds", "adapter load time")
        self.batch = histogram("forward_rows", "rows per forward", sizes)
        self.mixed = histogram("forward_adapters", "distinct adapters per forward", sizes)
        queue = Gauge("peftkit_queue_rows", "rows waiting for a forward", registry=r)
        queue.set_function(lambda: scheduler.queued_rows)
        resident = Gauge("peftkit_resident_adapters", "adapters in memory", registry=r)
        resident.set_function(lambda: len(scheduler.resident))

    def observe(self, stats: ForwardStats | LoadStats) -> None:
        """Called by the scheduler's worker after every forward and adapter load."""
        if isinstance(stats, LoadStats):
            self.loads.labels("error" if stats.error else "ok").inc()
            self.load_time.observe(stats.seconds)
            return
        self.forward.observe(stats.seconds)
        self.batch.observe(stats.rows)
        self.mixed.observe(stats.adapters)
        for wait in stats.waits:
            self.wait.observe(wait)

    def request(self, names: list[str], status: int, seconds: float) -> None:
        label = names[0] if len(set(names)) == 1 else "(mixed)" if names else "(none)"
        self.requests.labels(label, str(status)).inc()
        for name in names:
            self.rows.labels(name, str(status)).inc()
        self.total.observe(seconds)
