"""The online endpoint: a Ray Serve deployment with a FastAPI ingress around the same
:class:`~raydetect.detector.Detector` the batch job uses.

Requests from many clients are merged by ``@serve.batch`` into one ``Detector.detect`` call
(one engine call); each request keeps its own ``conf``/``iou``/``max_det`` because decoding
and NMS stay per image. Run it with ``raydetect serve --model M``, ``serve run
raydetect.serve:app_builder model=M`` or ``serve run deploy/serve_config.yaml``.
"""


import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import Response
from ray import serve

from raydetect.config import CONF_BOUNDS, IOU_BOUNDS, MAX_DET_BOUNDS, ServeConfig, validate
from raydetect.detector import Detector
from raydetect.job.via_serve import ARCHIVE_BUSY, replica_request_limit
from raydetect.serve import autoscale as serve_autoscale
from raydetect.serve import metrics as serve_metrics
from raydetect.serve.http import (
    IMAGE_TYPES,
    MULTIPART,
    MULTIPART_OVERHEAD,
    BatchResponse,
    DetectResponse,
    ModelInfo,
    PixelBudget,
    Upload,
    check_api_key,
    check_image_type,
    check_upload,
    decode_upload,
    enforce,
    image_body_openapi,
    media_type,
    parse_multipart,
    pixels_of,
    read_api_key,
    read_body,
    release_memory,
)
from raydetect.serve.metrics import ServeMetrics
from raydetect.types import ERROR_STATUS, ImageResult
from raydetect.version import __version__

log = logging.getLogger(__name__)

api = FastAPI(
    title="raydetect",
    version=__version__,
    description="YOLO object detection. Boxes are pixel xyxy in the original image. "
    "Send the API key (when one is configured) as 'Authorization: Bearer <key>' or 'X-API-Key'.",
)


def _actor_name() -> str | None:
    """This replica's Ray actor name (namespace ``serve``)."""
    import ray

    try:
        return ray.get_runtime_context().get_actor_name()
    except Exception:
        return None


class _MetricsMiddleware:
    """Counts every response by route and status and observes its latency in the replica.
    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) adds a
    task and a pair of memory streams to every request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        code = 500

        async def send_and_note(message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            metrics = serve_metrics.current()
            if metrics is not None:
                route = scope.get("route")
                path = getattr(route, "path", None) or "unmatched"
                metrics.record_request(path, code, (time.perf_counter() - t0) * 1e3)


api.add_middleware(_MetricsMiddleware)


# Query parameters: FastAPI answers 422 for values outside these ranges.
# the same bounds as the config fields (DetectorConfig.conf / iou / max_det)
ConfQuery = Query(None, **CONF_BOUNDS, description="Confidence threshold (default: the server's)")
IouQuery = Query(None, **IOU_BOUNDS, description="NMS IoU threshold (default: the server's)")
MaxDetQuery = Query(None, **MAX_DET_BOUNDS, description="Max detections (default: the server's)")


@dataclass
class _Job:
    """One image waiting for a batch: decoded pixels (CPU path) or checked bytes (GPU path)."""

    image: np.ndarray | bytes
    uri: str
    conf: float
    iou: float
    max_det: int
    enqueued: float
    taken: bool = False  # in an engine batch (no longer counted as waiting)


@dataclass
class _ArchiveBatch:
    """One batch of encoded images from a job run ``--via-serve``: its images wait in the
    archive queue and fill engine batches; ``done`` resolves when every one has its result."""

    images: list[bytes]
    uris: list[str]
    conf: float
    iou: float
    max_det: int
    enqueued: float
    done: asyncio.Future
    results: list[ImageResult | None] = field(default_factory=list)
    left: int = 0

    def finish(self, i: int, result: ImageResult) -> None:
        self.results[i] = result
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(None)


@serve.deployment(name="Detector")
@serve.ingress(api)
class DetectorServer:
    """One replica: one Detector (model + engine), dynamic batching over requests."""

    def __init__(self, config: dict[str, Any] | ServeConfig) -> None:
        cfg = config if isinstance(config, ServeConfig) else validate(ServeConfig, config, "serve")
        self.cfg = cfg
        self.api_key = read_api_key(cfg.api_key_env)
        det = cfg.detector
        if det.batch_size < cfg.max_batch_size:  # one engine call per batch of requests
            det = det.model_copy(update={"batch_size": cfg.max_batch_size})
        elif det.torch.compile_batches is None and det.batch_size > cfg.max_batch_size:
            # archive-only calls run batch_size images; online batches (<= max_batch_size) get a
            # compiled bucket of their own instead of being padded to batch_size
            det = det.model_copy(update={"torch": det.torch.model_copy(
                update={"compile_batches": (1, 8, cfg.max_batch_size)})})
        self.detector = Detector(det)
        self._calls = 0  # engine calls running (online or archive)
        self._online_calls = 0  # online engine calls running
        self._pixels = PixelBudget(cfg.max_pixels_in_flight, cfg.admission_timeout_s)
        # Two queues in front of the engine: online requests (Serve's batcher) and archive
        # images (jobs run --via-serve). Archive images fill the rest of each online batch and
        # get an engine call of their own only while no online request waits.
        self._online_waiting = 0  # online images accepted, not yet in an engine call
        self._online_running = 0  # online images in engine calls now
        self._archive: deque[tuple[_ArchiveBatch, int]] = deque()  # (batch, image index)
        self._archive_batches = 0  # archive batches held (queued or running)
        self._archive_running = 0  # archive images in engine calls now
        self._wake: asyncio.Condition | None = None
        self._archive_task: asyncio.Task | None = None
        on_gpu = str(self.detector.info().get("device") or "").startswith("cuda")
        self._fill = cfg.archive_fill == "on" or (cfg.archive_fill == "auto" and on_gpu)
        # archive_overlap: on a GPU an online batch does not wait for a running archive-only
        # call: it runs beside it, its data path on a CUDA stream of the highest priority (the
        # GPU schedules its kernels first). On a CPU it waits: the cores are the archive call's.
        self._beside = cfg.archive_overlap == "on" or (cfg.archive_overlap == "auto" and on_gpu)
        self._detect_batched.set_max_batch_size(cfg.max_batch_size)
        self._detect_batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.metrics = serve_metrics.install(ServeMetrics(serve.get_replica_context().app_name))
        self.model_id = self.detector.identity.as_dict()
        log.info("raydetect replica ready: %s", self.model_id)

    # --- routes -------------------------------------------------------------------------
    @api.get("/healthz", summary="Liveness: the replica has its model loaded")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/model", response_model=ModelInfo, summary="The model and engine behind the endpoint")
    async def model(self, request: Request) -> Response:
        check_api_key(request.headers, self.api_key)
        info = self.detector.info()
        return enforce(
            ModelInfo,
            {
                "sha256": info["sha256"],
                "url": info["url"],
                "names": {str(k): v for k, v in info["names"].items()},
                "imgsz": info["imgsz"],
                "layout": info["layout"],
                "engine": info["engine"],
                "precision": info["precision"],
                "device": info["device"],
                "max_batch_size": self.cfg.max_batch_size,
                "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s,
                "engine_batch_size": info["batch_size"],
            }
        )

    @api.post(
        "/v1/detect",
        response_model=DetectResponse,
        summary="Detect objects in one image",
        description=f"Raw body ({', '.join(IMAGE_TYPES)}) or a multipart upload with field 'file'.",
        openapi_extra=image_body_openapi(many=False),
    )
    async def detect(
        self,
        request: Request,
        conf: float | None = ConfQuery,
        iou: float | None = IouQuery,
        max_det: int | None = MaxDetQuery,
    ) -> Response:
        t0 = time.perf_counter()
        check_api_key(request.headers, self.api_key)
        return await self._with_timeout(self._detect_one(request, t0, conf, iou, max_det))

    @api.post(
        "/v1/detect/batch",
        response_model=BatchResponse,
        summary="Detect objects in several images (multipart, one part per image)",
        description="Each image gets its own status: one bad file does not fail the others.",
        openapi_extra=image_body_openapi(many=True),
    )
    async def detect_batch(
        self,
        request: Request,
        conf: float | None = ConfQuery,
        iou: float | None = IouQuery,
        max_det: int | None = MaxDetQuery,
    ) -> Response:
        t0 = time.perf_counter()
        check_api_key(request.headers, self.api_key)
        return await self._with_timeout(self._detect_many(request, t0, conf, iou, max_det))

    # --- archive work (raydetect detect --via-serve), through the deployment handle --------
    async def archive_info(self) -> dict[str, Any]:
        """The model and limits a job checks before sending batches (its manifest records them)."""
        info = self.detector.info()
        det = self.cfg.detector
        return {
            **self.model_id,
            "max_batch_size": self.cfg.max_batch_size,
            "engine_batch_size": self.detector.chunk,  # images per archive-only engine call
            "archive_max_batches": self.cfg.archive_max_batches,
            "max_request_bytes": replica_request_limit(),  # bytes one archive batch may carry
            "max_pixels": det.max_pixels,
            "max_bytes": det.max_bytes,
            "device": info["device"],
            "replica": _actor_name(),
        }

    async def detect_archive(self, images: list[bytes], uris: list[str], conf: float | None = None,
                             iou: float | None = None, max_det: int | None = None):
        """Detect in one batch of encoded images from a job; returns the result rows (a
        ``pyarrow.Table``, the job's schema) or :data:`ARCHIVE_BUSY` when this replica already
        holds ``archive_max_batches`` batches (nothing was queued: send it again later)."""
        if len(images) != len(uris):
            raise ValueError(f"{len(images)} images but {len(uris)} uris")
        if self._archive_batches >= self.cfg.archive_max_batches:
            self.metrics.record_archive_busy()
            return ARCHIVE_BUSY
        det = self.cfg.detector
        loop = asyncio.get_running_loop()
        batch = _ArchiveBatch(
            images=[bytes(b) for b in images],
            uris=list(uris),
            conf=det.conf if conf is None else float(conf),
            iou=det.iou if iou is None else float(iou),
            max_det=det.max_det if max_det is None else int(max_det),
            enqueued=time.perf_counter(),
            done=loop.create_future(),
            results=[None] * len(images),
            left=len(images),
        )
        if not images:
            return self.detector.to_table([])
        self._archive_batches += 1
        try:
            self._archive.extend((batch, i) for i in range(len(images)))
            self._note_depths()
            self._ensure_archive_loop()
            wake = self._wake_cond()
            async with wake:
                wake.notify_all()
            await batch.done
        finally:
            self._archive_batches -= 1
            self._note_depths()
        return self.detector.to_table(batch.results)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (see :mod:`raydetect.serve.autoscale`)."""
        return {
            serve_autoscale.ONLINE: float(self._online_waiting + self._online_running),
            serve_autoscale.ARCHIVE: float(len(self._archive) + self._archive_running),
        }

    def _wake_cond(self) -> asyncio.Condition:
        if self._wake is None:  # made on the replica's event loop, at first use
            self._wake = asyncio.Condition()
        return self._wake

    def _ensure_archive_loop(self) -> None:
        if self._archive_task is None or self._archive_task.done():
            self._archive_task = asyncio.get_running_loop().create_task(self._archive_loop())

    def _take_archive(self, n: int) -> list[tuple[_ArchiveBatch, int]]:
        out = []
        while self._archive and len(out) < n:
            out.append(self._archive.popleft())
        return out

    async def _archive_loop(self) -> None:
        """Runs archive images whenever the engine is free and no online request waits."""
        wake = self._wake_cond()
        while True:
            async with wake:
                await wake.wait_for(lambda: self._archive and self._calls == 0 and self._online_waiting == 0)
                self._calls += 1  # the engine is this call's now (online requests: _online_may_start)
            try:
                # an archive-only call runs the engine's own batch (the detector's batch_size),
                # which may be larger than an online batch: online requests arriving meanwhile
                # run beside it on a GPU, and on a CPU wait for at most this one call
                taken = self._take_archive(self.detector.chunk)
                await self._run_engine([], taken)
            finally:
                self._calls -= 1
                async with wake:
                    wake.notify_all()

    async def _run_engine(self, jobs: list[_Job], taken: list[tuple[_ArchiveBatch, int]]):
        """One engine call over online ``jobs`` then archive images ``taken``; archive
        results go to their batches, the online ones are returned (with the timings)."""
        started = time.perf_counter()
        images: list[Any] = [j.image for j in jobs] + [b.images[i] for b, i in taken]
        uris = [j.uri for j in jobs] + [b.uris[i] for b, i in taken]
        conf = [j.conf for j in jobs] + [b.conf for b, _ in taken]
        iou = [j.iou for j in jobs] + [b.iou for b, _ in taken]
        max_det = [j.max_det for j in jobs] + [b.max_det for b, _ in taken]
        self._online_running += len(jobs)  # += : an online call may run beside an archive call
        self._archive_running += len(taken)
        self._note_depths()
        # online calls first on the GPU: their data path on the highest-priority CUDA stream
        priority = -100 if jobs and self._beside else 0
        try:
            results, t = await asyncio.to_thread(self._detect_now, images, uris, conf, iou, max_det, priority)
        except BaseException as e:  # the engine call itself failed: fail the archive batches
            for b in {id(b): b for b, _ in taken}.values():
                if not b.done.done():
                    b.done.set_exception(e if isinstance(e, Exception) else RuntimeError(str(e)))
            raise
        finally:
            self._online_running -= len(jobs)
            self._archive_running -= len(taken)
            self._note_depths()
        self.metrics.record_engine(
            online=len(jobs),
            archive=len(taken),
            online_wait_ms=[(started - j.enqueued) * 1e3 for j in jobs],
            archive_wait_ms=[(started - b.enqueued) * 1e3 for b, _ in taken],
        )
        for (b, i), r in zip(taken, results[len(jobs):], strict=True):
            b.finish(i, r)
        return results[: len(jobs)], t, started

    def _note_depths(self) -> None:
        self.metrics.set_depths(self._online_waiting, len(self._archive), self._archive_batches)

    # --- request handling ---------------------------------------------------------------
    async def _with_timeout(self, work) -> Response:
        try:
            return await asyncio.wait_for(work, timeout=self.cfg.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"request took longer than timeout_s {self.cfg.timeout_s} s") from None

    async def _detect_one(self, request: Request, t0: float, conf, iou, max_det) -> Response:
        det = self.cfg.detector
        ctype = media_type(request.headers.get("content-type"))
        if ctype == MULTIPART:
            body = await read_body(request, det.max_bytes + MULTIPART_OVERHEAD, self.cfg.read_timeout_s)
            uploads = await parse_multipart(request, body, 1, det.max_bytes)
            files = [u for u in uploads if u.field == "file"]
            if len(files) != 1:
                raise HTTPException(400, f"multipart upload needs exactly one file field 'file' "
                                         f"(got {len(files)})")
            upload = files[0]
            check_image_type(upload.content_type, part=True)
        else:
            check_image_type(ctype)
            upload = Upload("body", "body", ctype, await read_body(request, det.max_bytes, self.cfg.read_timeout_s))
        result, timings = await self._run(upload, conf, iou, max_det)
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return enforce(DetectResponse, {**result.to_dict(), "model": self.model_id, "timings": timings})

    async def _detect_many(self, request: Request, t0: float, conf, iou, max_det) -> Response:
        det, cfg = self.cfg.detector, self.cfg
        ctype = media_type(request.headers.get("content-type"))
        if ctype != MULTIPART:
            raise HTTPException(415, f"/v1/detect/batch takes a multipart upload, not {ctype or 'none'!r}")
        limit = cfg.max_files * (det.max_bytes + MULTIPART_OVERHEAD)
        body = await read_body(request, limit, cfg.read_timeout_s)
        uploads = await parse_multipart(request, body, cfg.max_files, det.max_bytes)
        if not uploads:
            raise HTTPException(400, "multipart upload holds no files")

        async def one(upload: Upload) -> dict[str, Any]:
            try:
                check_image_type(upload.content_type, part=True)
                result, timings = await self._run(upload, conf, iou, max_det)
            except HTTPException as e:
                return {"status": e.status_code, "uri": upload.name, "error": e.detail}
            timings["total_ms"] = (time.perf_counter() - t0) * 1e3
            return {"status": 200, **result.to_dict(), "timings": timings}

        results = await asyncio.gather(*(one(u) for u in uploads))
        return enforce(BatchResponse, {"model": self.model_id, "results": results})

    async def _run(self, upload: Upload, conf, iou, max_det) -> tuple[ImageResult, dict[str, float]]:
        # Decoded pixels in flight are bounded (max_pixels_in_flight): big images wait for room.
        held = await self._pixels.acquire(pixels_of(upload.data, self.cfg.detector.max_pixels))
        try:
            return await self._run_admitted(upload, conf, iou, max_det)
        finally:
            self._pixels.release(held)
            if self._pixels.in_use == 0 and held >= 4_000_000:  # ~12 MB of pixels just freed
                await asyncio.to_thread(release_memory)

    async def _run_admitted(self, upload: Upload, conf, iou, max_det) -> tuple[ImageResult, dict[str, float]]:
        det = self.cfg.detector
        t0 = time.perf_counter()
        image: np.ndarray | bytes
        if self.detector.gpu is None:  # CPU path: decode here, while the engine runs others
            image = await asyncio.to_thread(decode_upload, upload.data, det.max_pixels, det.max_bytes)
        else:  # GPU path: the detector decodes the whole batch (nvJPEG); check the header here
            check_upload(upload.data, det.max_pixels, det.max_bytes)  # header only: tens of µs
            image = upload.data
        decode_ms = (time.perf_counter() - t0) * 1e3
        job = _Job(
            image=image,
            uri=upload.name,
            conf=det.conf if conf is None else conf,
            iou=det.iou if iou is None else iou,
            max_det=det.max_det if max_det is None else max_det,
            enqueued=time.perf_counter(),
        )
        # Ray Serve's batcher (2.60) forms the next batch as soon as the previous one *starts* and
        # parks it until the engine is free, so requests arriving during a long engine call
        # would be spread over many small batches. Holding them here while the engine is busy
        # lets them join one batch when it frees up.
        self._online_waiting += 1
        try:
            wake = self._wake_cond()
            async with wake:
                await wake.wait_for(self._online_may_start)
            result, timings = await self._detect_batched(job)
        finally:
            if not job.taken:  # cancelled (timeout) before a batch took it
                self._online_waiting -= 1
        if result.error is not None:  # the status comes from the error's kind, set where it was caught
            if result.error_kind == "engine":
                raise RuntimeError(result.error)  # the server's fault: 500
            raise HTTPException(ERROR_STATUS[result.error_kind or "input"], result.error)
        return result, {"decode_ms": decode_ms, **timings}

    def _online_may_start(self) -> bool:
        """No online call running, and on a CPU no archive call either (see ``_beside``)."""
        return self._online_calls == 0 if self._beside else self._calls == 0

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)  # reset from the config in __init__
    async def _detect_batched(self, jobs: list[_Job]) -> list[tuple[ImageResult, dict[str, float]]]:
        self.metrics.record_batch(len(jobs))
        for j in jobs:
            j.taken = True
        self._online_waiting -= len(jobs)
        self._calls += 1
        self._online_calls += 1
        # archive images fill the rest of the engine batch (never delaying it: they are queued)
        taken = self._take_archive(self.cfg.max_batch_size - len(jobs)) if self._fill else []
        try:
            results, t, started = await self._run_engine(jobs, taken)
        finally:
            self._calls -= 1
            self._online_calls -= 1
            async with self._wake_cond():
                self._wake_cond().notify_all()
        shared = {
            "preprocess_ms": t.decode * 1e3,
            "inference_ms": t.infer * 1e3,
            "postprocess_ms": t.postprocess * 1e3,
            "batch_size": len(jobs),
            "archive_images": len(taken),
        }
        return [(r, {"queue_ms": (started - j.enqueued) * 1e3, **shared}) for r, j in zip(results, jobs, strict=True)]

    def _detect_now(self, images, uris, conf, iou, max_det, priority: int = 0):
        return self.detector.detect_timed(images, uris, conf=conf, iou=iou, max_det=max_det,
                                          stream_priority=priority)


# --- building the application -------------------------------------------------------------


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Replicas (fixed or autoscaled), resources and queue limit of the deployment."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
    }
    if cfg.min_replicas == cfg.max_replicas:
        opts["num_replicas"] = cfg.max_replicas
    else:
        archive_cap = cfg.max_replicas if cfg.archive_max_replicas is None else cfg.archive_max_replicas
        opts["autoscaling_config"] = {
            "min_replicas": cfg.min_replicas,
            "max_replicas": cfg.max_replicas,
            "target_ongoing_requests": cfg.target_ongoing_requests,
            # online and archive load as the replicas report them (record_autoscaling_stats)
            "policy": {
                "policy_function": "raydetect.serve.autoscale:SharedPoolPolicy",
                "policy_kwargs": {"target": cfg.target_ongoing_requests, "archive_max_replicas": archive_cap},
            },
        }
    return opts


def build_app(cfg: ServeConfig) -> serve.Application:
    return DetectorServer.options(**deployment_options(cfg)).bind(cfg.model_dump(mode="json"))


def serve_config_from_args(args: ServeConfig | dict[str, Any]) -> ServeConfig:
    """A :class:`ServeConfig` from builder args (``serve run ... key=value`` or the ``args`` of a
    Serve config file); the spellings they allow (flat detector fields, ``replicas`` as ``N`` or
    ``MIN:MAX``, ``batch_wait_ms``) are the model's own (``ServeConfig._spellings``)."""
    return args if isinstance(args, ServeConfig) else validate(ServeConfig, dict(args), "serve")


def app_builder(args: ServeConfig) -> serve.Application:
    """Typed application builder for ``serve run raydetect.serve:app_builder model=...`` and for
    Serve config files (``import_path: raydetect.serve:app_builder`` with ``args``): Serve
    validates the args into :class:`ServeConfig` before calling it (this module has no
    ``from __future__ import annotations``: Serve needs the annotation object, not a string)."""
    return build_app(serve_config_from_args(args))
