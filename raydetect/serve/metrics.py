"""Metrics of the online endpoint through Ray's metrics API (``ray.util.metrics``).

Ray exports them on each node's Prometheus endpoint (``ray.init(_metrics_export_port=...)``
or ``ray start --metrics-export-port``) with a ``ray_`` prefix, counters with ``_total``:

* ``ray_raydetect_requests_total{app, route, code}`` — every HTTP response;
* ``ray_raydetect_errors_total{app, route, code}`` — responses with status >= 400;
* ``ray_raydetect_request_latency_ms{app, route}`` — histogram, in the replica;
* ``ray_raydetect_batch_size{app}`` — histogram, images per engine call;
* ``ray_raydetect_queue_depth{app, queue}`` — gauge, images waiting per queue (``online``,
  ``archive``; ``archive_batches``: archive batches held, at most ``archive_max_batches``);
* ``ray_raydetect_queue_wait_ms{app, queue}`` — histogram, from arrival to the engine call;
* ``ray_raydetect_queue_images_total{app, queue}`` — images run per queue (``rate()``: images/s);
* ``ray_raydetect_archive_busy_total{app}`` — archive batches refused as busy (backpressure).
"""

from __future__ import annotations

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 15, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000, 10000]
BATCH_SIZE_BOUNDARIES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024]


class ServeMetrics:
    """The endpoint's metrics, created once per replica process (Ray metrics must be made
    inside a Ray worker or driver)."""

    def __init__(self, app: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

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

        self.depth = Gauge(
            "raydetect_queue_depth",
            description="Images waiting in front of the engine per queue (online, archive) and "
            "archive batches held (archive_batches)",
            tag_keys=("app", "queue"),
        )
        self.wait = Histogram(
            "raydetect_queue_wait_ms",
            description="Milliseconds from arrival to the engine call, per queue",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("app", "queue"),
        )
        self.images = Counter(
            "raydetect_queue_images",
            description="Images run by the engine per queue (online, archive)",
            tag_keys=("app", "queue"),
        )
        self.busy = Counter(
            "raydetect_archive_busy",
            description="Archive batches answered busy (the replica held archive_max_batches)",
            tag_keys=("app",),
        )
        self._depths: tuple[int, int, int] | None = None

    def set_depths(self, online: int, archive: int, archive_batches: int) -> None:
        depths = (online, archive, archive_batches)
        if depths == self._depths:
            return
        self._depths = depths
        for queue, value in zip(("online", "archive", "archive_batches"), depths, strict=True):
            self.depth.set(value, tags={"app": self.app, "queue": queue})

    def record_engine(self, *, online: int, archive: int, online_wait_ms: list[float],
                      archive_wait_ms: list[float]) -> None:
        """One engine call over ``online`` + ``archive`` images."""
        for queue, n, waits in (("online", online, online_wait_ms), ("archive", archive, archive_wait_ms)):
            if not n:
                continue
            tags = {"app": self.app, "queue": queue}
            self.images.inc(n, tags=tags)
            for w in waits:
                self.wait.observe(w, tags=tags)

    def record_archive_busy(self) -> None:
        self.busy.inc(tags={"app": self.app})

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

