"""The batch job through a running Serve application (``raydetect detect --via-serve APP``).

Instead of starting detector actors, the job's Ray Data pipeline sends its batches of encoded
images to the application's replicas through the deployment handle
(``serve.get_app_handle(APP).options(method_name="detect_archive")``). The replicas run them
between online requests (see ``DetectorServer.detect_archive``): online first, archive images
fill the rest of each engine batch. Everything else of the job — listing, shards, exactly-once
part files, resume, manifest, report — is unchanged (:mod:`raydetect.job.run`).

Faults: a call that fails because its replica died (or is busy, or the deployment is briefly
unavailable) is sent again, to whichever replica the router picks; the shard writer drops a
row that arrives twice, so a dead replica costs a retry, never a lost or repeated row.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa

from raydetect.config import ConfigError
from raydetect.storage import read_batch
from raydetect.types import error_rows

log = logging.getLogger(__name__)

ARCHIVE_METHOD = "detect_archive"
#: What ``DetectorServer.detect_archive`` answers when the replica holds ``archive_max_batches``
#: already: nothing was queued, the caller sends the batch again (to this or another replica).
ARCHIVE_BUSY = "busy"
INFO_METHOD = "archive_info"
#: How long a call keeps retrying a dead/unavailable replica before the job task fails.
RETRY_WINDOW_S = 120.0
#: Room left in a request for what is not image bytes (pickled lists, URIs, parameters).
REQUEST_OVERHEAD = 64 * 1024


def replica_request_limit() -> int | None:
    """The most bytes one handle call can carry to a replica of this Ray instance: Serve's
    gRPC transport between deployments (on with ``RAY_SERVE_THROUGHPUT_OPTIMIZED``, the HAProxy
    ingress) refuses larger messages (``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``, 4 MiB by
    default). None: no such limit (Ray's object transport)."""
    try:
        from ray.serve._private import constants
    except ImportError:  # pragma: no cover - Ray without Serve
        return None
    if not getattr(constants, "RAY_SERVE_USE_GRPC_BY_DEFAULT", False):
        return None
    return getattr(constants, "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH", None)


def split_requests(sizes: list[int], max_images: int, max_bytes: int | None) -> tuple[list[list[int]], list[int]]:
    """Indices of images (``sizes`` in bytes) cut into requests of at most ``max_images``
    images and ``max_bytes`` bytes (less :data:`REQUEST_OVERHEAD`), in order; and the images too
    large to travel alone."""
    budget = None if max_bytes is None else max(1, max_bytes - REQUEST_OVERHEAD)
    requests: list[list[int]] = []
    too_large: list[int] = []
    cur: list[int] = []
    used = 0
    for i, n in enumerate(sizes):
        if budget is not None and n > budget:
            too_large.append(i)
            continue
        if cur and (len(cur) >= max_images or (budget is not None and used + n > budget)):
            requests.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    if cur:
        requests.append(cur)
    return requests, too_large


class ServeAppError(ConfigError):
    """The Serve application named by ``--via-serve`` is missing, unhealthy or not raydetect's."""


def _retryable() -> tuple[type[BaseException], ...]:
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    return (
        rex.RayActorError,  # includes ActorDiedError: the replica died mid-call
        rex.ActorUnavailableError,
        sex.BackPressureError,
        sex.DeploymentUnavailableError,
    ) + ((sex.ReplicaUnavailableError,) if hasattr(sex, "ReplicaUnavailableError") else ())


def app_handle(app: str):
    """A handle to ``app`` usable from synchronous code (driver, Ray Data actors). With Serve's
    throughput-optimized mode (the HAProxy ingress) handles default to routing on the caller's
    asyncio loop, which plain threads lack; this one runs its router in a loop of its own."""
    from ray import serve

    handle = serve.get_app_handle(app)
    if not handle.is_initialized:
        handle._init(_run_router_in_separate_loop=True)
    return handle


def connect(app: str, timeout_s: float = 60.0) -> tuple[Any, dict[str, Any]]:
    """The handle of the running raydetect application ``app`` and what its replicas report
    (``archive_info``: model sha256, engine, limits). Raises :class:`ServeAppError` with the
    reason when the app is missing or not healthy."""
    from ray import serve

    try:
        apps = serve.status().applications
    except Exception as e:  # Serve not started on this cluster
        raise ServeAppError(f"--via-serve {app}: no Ray Serve instance on this cluster ({e})") from None
    if app not in apps:
        names = ", ".join(sorted(apps)) or "none"
        raise ServeAppError(f"--via-serve {app}: no such Serve application (running: {names})")
    status = str(getattr(apps[app].status, "value", apps[app].status))
    if status != "RUNNING":
        msg = getattr(apps[app], "message", "") or ""
        raise ServeAppError(f"--via-serve {app}: application is {status}, not RUNNING {msg}".rstrip())
    handle = app_handle(app)
    try:
        info = handle.options(method_name=INFO_METHOD).remote().result(timeout_s=timeout_s)
    except AttributeError:
        raise ServeAppError(f"--via-serve {app}: not a raydetect application (no {INFO_METHOD})") from None
    except Exception as e:
        raise ServeAppError(f"--via-serve {app}: replicas did not answer {INFO_METHOD}: {e}") from e
    return handle, info


class ServeCaller:
    """The job's ``map_batches`` callable with ``--via-serve``: each Ray Data batch is cut into
    sub-batches of the replicas' engine batch (``engine_batch_size``: one archive-only engine
    call), all sent at once (several archive batches
    in flight per caller), and their rows concatenated. The batch's files are read here, from
    ``fs`` (:func:`~raydetect.storage.read_batch`). Busy answers and dead replicas are
    retried with backoff for up to :data:`RETRY_WINDOW_S`."""

    def __init__(self, app: str, model_sha256: str, sub_batch: int, conf: float, iou: float,
                 max_det: int, fs: Any, uri_prefix: str = "", job: str = "raydetect",
                 max_request_bytes: int | None = None, precision: str | None = None) -> None:
        from raydetect.job.metrics import JobMetrics

        self.app = app
        self.model_sha256 = model_sha256
        self.precision = precision
        self.sub_batch = max(1, int(sub_batch))
        self.max_request_bytes = max_request_bytes
        self.params = {"conf": conf, "iou": iou, "max_det": max_det}
        self.uri_prefix = uri_prefix
        self.fs = fs
        self.metrics = JobMetrics(job)
        self.retries = 0
        self._handle = None

    def handle(self):
        if self._handle is None:
            self._handle = app_handle(self.app).options(method_name=ARCHIVE_METHOD)
        return self._handle

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        t0 = time.perf_counter()
        images, uris, unreadable = read_batch(batch, self.fs, self.uri_prefix)
        requests, too_large = split_requests([len(b) for b in images], self.sub_batch, self.max_request_bytes)
        chunks = [([images[i] for i in r], [uris[i] for i in r]) for r in requests]
        tables: list[pa.Table | None] = [None] * len(chunks)
        if too_large:
            tables.append(self._too_large([uris[i] for i in too_large], [len(images[i]) for i in too_large]))
        if unreadable:
            tables.append(error_rows(unreadable, "", self.model_sha256, self.precision))
        pending = {i: self.handle().remote(imgs, us, **self.params) for i, (imgs, us) in enumerate(chunks)}
        first_failure: dict[int, float] = {}
        delay = 0.01
        retryable = _retryable()
        while pending:
            again = []
            for i, resp in list(pending.items()):
                try:
                    out = resp.result()
                except retryable as e:
                    started = first_failure.setdefault(i, time.monotonic())
                    if time.monotonic() - started > RETRY_WINDOW_S:
                        raise RuntimeError(
                            f"--via-serve {self.app}: no replica ran a batch within {RETRY_WINDOW_S:.0f} s "
                            f"(last error: {type(e).__name__}: {e})"
                        ) from e
                    log.warning("--via-serve %s: %s; sending the batch again", self.app, type(e).__name__)
                    self.retries += 1
                    again.append(i)
                    continue
                if isinstance(out, str) and out == ARCHIVE_BUSY:
                    again.append(i)
                    continue
                self._check_model(out)
                tables[i] = out
                del pending[i]
            if again:
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                for i in again:
                    imgs, us = chunks[i]
                    pending[i] = self.handle().remote(imgs, us, **self.params)
            else:
                delay = 0.01
        table = pa.concat_tables([t for t in tables if t is not None])
        self.metrics.record(table, time.perf_counter() - t0)
        return table

    def _too_large(self, uris: list[str], sizes: list[int]) -> pa.Table:
        """Error rows for images larger than one request to a replica may be (no engine ran)."""
        limit = self.max_request_bytes
        reasons = {uri: f"{n} bytes: larger than one request to the Serve replicas may be ({limit} bytes, "
                        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH); run it without --via-serve"
                   for uri, n in zip(uris, sizes, strict=True)}
        return error_rows(reasons, "", self.model_sha256, self.precision)

    def _check_model(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        shas = set(table.column("model_sha256").to_pylist())
        if shas != {self.model_sha256}:
            raise ServeAppError(
                f"--via-serve {self.app}: a replica answered with model sha256 {sorted(shas)}, but the "
                f"job runs {self.model_sha256} (the application was updated mid-job?)"
            )
