"""Metrics of the online endpoint through Ray's metrics API (``ray.util.metrics``).

Ray exports them on each node's Prometheus endpoint (``ray.init(_metrics_export_port=...)``
or ``ray start --metrics-export-port``) with a ``ray_`` prefix, counters with ``_total``:

* ``ray_raydetect_requests_total{app, route, code}`` — every HTTP response;
* ``ray_raydetect_errors_total{app, route, code}`` — responses with status >= 400;
* ``ray_raydetect_request_latency_ms{app, route}`` — histogram, in the replica;
* ``ray_raydetect_batch_size{app}`` — histogram, images per engine call.
"""

from __future__ import annotations

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000, 10000]
BATCH_SIZE_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024]


class ServeMetrics:
    """The endpoint's metrics, created once per replica process (Ray metrics must be made
    inside a Ray worker or driver)."""

    def __init__(self, app: str) -> None:
        from ray.util.metrics import Counter, Histogram

        self.app = app
        self.requests = Counter(
            "raydetect_requests",
            description="HTTP responses of the raydetect endpoint by route and status code",
            tag_keys=("app", "route", "code"),
        )
        self.errors = Counter(
            "raydetect_errors",
            description="HTTP error responses (status >= 400) of the raydetect endpoint by code",
            tag_keys=("app", "route", "code"),
        )
        self.latency = Histogram(
            "raydetect_request_latency_ms",
            description="Request latency inside the replica, milliseconds",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("app", "route"),
        )
        self.batch_size = Histogram(
            "raydetect_batch_size",
            description="Images per engine call (requests merged by dynamic batching)",
            boundaries=BATCH_SIZE_BOUNDARIES,
            tag_keys=("app",),
        )

    def record_request(self, route: str, code: int, latency_ms: float) -> None:
        tags = {"app": self.app, "route": route, "code": str(code)}
        self.requests.inc(tags=tags)
        if code >= 400:
            self.errors.inc(tags=tags)
        self.latency.observe(latency_ms, tags={"app": self.app, "route": route})

    def record_batch(self, size: int) -> None:
        self.batch_size.observe(size, tags={"app": self.app})


#: The metrics of this replica process (Serve runs one replica per process).
_replica_metrics: ServeMetrics | None = None


def install(metrics: ServeMetrics) -> ServeMetrics:
    """Make ``metrics`` the replica's (called by the deployment's constructor). A module-level
    function on purpose: Serve ships the deployment class by value, so a ``global`` assigned
    inside its methods would not be the global the HTTP middleware reads."""
    global _replica_metrics
    _replica_metrics = metrics
    return metrics


def current() -> ServeMetrics | None:
    return _replica_metrics

