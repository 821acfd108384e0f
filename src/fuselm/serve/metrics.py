"""Prometheus metrics of one server (its own registry, so several servers in one process do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("fuselm_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.tokens = Counter("fuselm_tokens", "tokens processed", ["kind"], registry=r)  # prompt | completion
        self.cancelled = Counter("fuselm_cancelled_requests", "requests ended early (client gone or finished)",
                                 registry=r)
        self.queue_depth = Gauge("fuselm_queue_depth", "requests waiting for the engine", registry=r)
        self.running = Gauge("fuselm_requests_running", "requests being decoded", registry=r)
        self.batch_occupancy = Gauge("fuselm_batch_occupancy", "running requests / --parallel", registry=r)
        self.time_to_first_token = Histogram("fuselm_time_to_first_token_seconds",
                                             "from submission to the first sampled token", buckets=TTFT_BUCKETS,
                                             registry=r)

    def set_load(self, *, waiting: int, running: int, parallel: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)
        self.batch_occupancy.set(running / parallel)

    def render(self) -> bytes:
        return generate_latest(self.registry)
