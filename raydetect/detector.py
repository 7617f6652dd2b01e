"""The Detector: encoded images (or arrays) in batches → :class:`ImageResult` per image.

It is the callable class Ray Data's ``map_batches`` runs in an actor pool, and the
model behind the Serve deployment. One detector holds one model card, one engine and the
stages chosen for it (:mod:`raydetect.stages.base`): the preprocessor by the engine's input kind
(torch tensors: decode and letterbox on the GPU, for the torch engine and TensorRT alike), the
postprocessor by the engine's output (raw head: NumPy or batched torch NMS; rows: the engine's
own NMS). ``detect`` is one loop over chunks of ``batch_size`` images that prepares chunk k+1
while the GPU runs chunk k; its stage timings come back with the results (``speed``).
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from raydetect.config import DetectorConfig, validate
from raydetect.engines import create_engine
from raydetect.engines.base import NMSOutput
from raydetect.model_card import ModelCard, batch_check_error, batching_check_input
from raydetect.stages.base import CpuPreprocessor, PreparedBatch, Rows, choose_stages, make_postprocessor
from raydetect.stages.postprocess import nms_outputs_close
from raydetect.stages.preprocess import Letterbox, unletterbox_many
from raydetect.types import DetectionArray, ImageResult, ModelIdentity, results_to_table

log = logging.getLogger(__name__)

ImageInput = bytes | bytearray | memoryview | np.ndarray


@dataclass
class Timings:
    """Seconds spent in each stage by one :meth:`Detector.detect_timed` call."""

    decode: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    images: int = 0
    batches: int = 0
    decoders: dict[str, int] | None = None  # images per decoder ("nvimgcodec", "nvjpeg", "cpu", ...)

    def as_dict(self) -> dict[str, float]:
        return {
            "decode_ms": self.decode * 1e3,
            "infer_ms": self.infer * 1e3,
            "postprocess_ms": self.postprocess * 1e3,
            "images": self.images,
            "batches": self.batches,
        }

    def speed(self) -> dict[str, float]:
        """Milliseconds per image by stage (Ultralytics' ``Results.speed``)."""
        n = max(self.images, 1)
        return {"preprocess": self.decode * 1e3 / n, "inference": self.infer * 1e3 / n,
                "postprocess": self.postprocess * 1e3 / n}


def _per_image(value, n: int, name: str) -> list:
    """One value for every image, or a sequence of exactly ``n`` values."""
    if isinstance(value, numbers.Number):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{n} images but {len(values)} values of {name}")
    return values


class Detector:
    """Detect objects in batches of images with one engine.

    ``Detector(config)`` loads the model (from a path or s3:// URL), picks the engine and the
    stages, verifies batching when the graph was rewritten to a dynamic batch and warms up.
    """

    def __init__(self, config: DetectorConfig | dict[str, Any], uri_prefix: str = "") -> None:
        if not isinstance(config, DetectorConfig):
            config = validate(DetectorConfig, config, "detector")
        self.config = config
        self.uri_prefix = uri_prefix
        self.card = ModelCard.load(config.model, config.storage)
        self.engine = create_engine(self.card, config)
        self.chunk = config.batch_size
        if self.engine.max_batch is not None:
            self.chunk = min(self.chunk, self.engine.max_batch)
        self._stages_of = None
        self._choose_stages()
        self.batching_verified = self._verify_batching()
        #: GPU path: prepare chunk k+1 while the GPU runs chunk k (within one ``detect`` call).
        self.overlap = True
        #: Totals over this detector's life: bytes uploaded, images per decoder.
        self.gpu_counters: dict[str, int] = {"h2d_bytes": 0, "nvjpeg": 0, "cpu_decoded": 0}
        self._streams = threading.local()  # the CUDA stream of each calling thread
        self._counters_lock = threading.Lock()

    # --- stages -------------------------------------------------------------------------
    def _choose_stages(self) -> None:
        """The preprocessor by the engine's input kind, the postprocessor by its output."""
        eng = self.engine
        self.stages = choose_stages(eng.input_kind, eng.nms_in_engine)
        if self.stages.preprocess == "gpu":
            from raydetect.stages.gpu_preprocess import GpuPreprocessor

            self.preprocessor = GpuPreprocessor(
                self.card.imgsz,
                eng.device,
                dtype=getattr(eng, "dtype", None),
                max_pixels=self.config.max_pixels,
                max_bytes=self.config.max_bytes,
                decoder=self.config.image_decoder if str(eng.device).startswith("cuda") else "auto",
            )
        else:
            self.preprocessor = CpuPreprocessor(self.card.imgsz, self.config.max_pixels, self.config.max_bytes)
        self.postprocessor = make_postprocessor(self.stages.postprocess, self.card.layout)
        self._stages_of = eng

    @property
    def gpu(self):
        """The GPU preprocessor (decode + letterbox in torch on the engine's device), or None on
        the CPU data path."""
        if self._stages_of is not self.engine:  # the engine was swapped (tests): choose again
            self._choose_stages()
        return self.preprocessor if self.stages.preprocess == "gpu" else None

    # --- identity -----------------------------------------------------------------------
    @property
    def names(self) -> dict[int, str]:
        return self.card.names

    def info(self) -> dict[str, Any]:
        pre = self.preprocessor
        return {
            **self.card.summary(),
            **self.engine.metadata(),
            "batch_size": self.chunk,
            "batching_verified": self.batching_verified,
            "stages": {"preprocess": self.stages.preprocess, "postprocess": self.stages.postprocess,
                       "image_decoder": getattr(pre, "decoder", "cpu")},
        }

    def _verify_batching(self) -> bool:
        """Run one image alone and inside a batch; on mismatch fall back to chunks of 1.
        Doubles as the warm-up. An engine that checked itself (``batch_consistent``, with the
        same tolerance table) is not checked twice."""
        own = getattr(self.engine, "batch_consistent", None)
        if own is not None:
            if not own:
                self.chunk = 1
            return bool(own)
        x = batching_check_input(self.card.imgsz, n=2)
        if self.engine.nms_in_engine:
            return self._verify_batching_nms(x)
        alone = np.asarray(self._infer(x[:1]))
        if not self.card.batch_rewritten or self.chunk == 1:
            return True
        both = np.asarray(self._infer(x))
        ok, err, tol = batch_check_error(alone, both, self.engine.precision)
        if not ok:
            log.warning(
                "%s: the graph rewritten to a dynamic batch gives different outputs in a batch "
                "(relative error %.3g > %g for %s); running images one at a time",
                self.card.url,
                err,
                tol,
                self.engine.precision,
            )
            self.chunk = 1
            return False
        return True

    def _verify_batching_nms(self, x: np.ndarray) -> bool:
        """:meth:`_verify_batching` for engines with NMS inside: compare final detections."""
        cfg = self.config
        self.engine.set_nms_params(cfg.conf, cfg.iou, cfg.max_det)
        alone = self._infer(x[:1])
        if not self.card.batch_rewritten or self.chunk == 1:
            return True
        both = self._infer(x)
        if nms_outputs_close(alone, 0, both, 0):
            return True
        log.warning("%s: detections differ when batched; running images one at a time", self.card.url)
        self.chunk = 1
        return False

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.engine.infer(x)

    def _infer_nms(self, x, conf: list[float], iou: list[float], max_det: list[int]) -> NMSOutput:
        """Engines with NMS inside take one conf/IoU per call: images sharing an IoU run
        together at the lowest conf among them (higher ones and smaller max_det are applied
        exactly afterwards by :func:`nms_output_rows`)."""
        groups: dict[float, list[int]] = {}
        for j, v in enumerate(iou):
            groups.setdefault(float(v), []).append(j)
        outs, order = [], []
        for v, idx in groups.items():
            self.engine.set_nms_params(min(conf[j] for j in idx), v, max(max_det[j] for j in idx))
            outs.append(self._infer(x if len(groups) == 1 else x[idx]))
            order.extend(idx)
        if len(outs) == 1:
            return outs[0]
        inv = np.argsort(np.asarray(order))
        fields = [np.concatenate([getattr(o, f) for o in outs])[inv] for f in ("num", "boxes", "scores", "classes")]
        return NMSOutput(*fields)

    # --- the public stages --------------------------------------------------------------
    def prepare(self, images: Sequence[ImageInput]) -> PreparedBatch:
        """Stage 1: decode + letterbox ``images`` on the engine's device."""
        if self._stages_of is not self.engine:
            self._choose_stages()
        return self.preprocessor.prepare(images)

    def infer(self, batch: PreparedBatch, conf: list[float], iou: list[float], max_det: list[int]):
        """Stage 2: the engine on a prepared batch (``conf``/``iou``/``max_det`` per row, used
        by engines with NMS inside). On the GPU the call returns before the GPU finishes."""
        if self.engine.nms_in_engine:
            return self._infer_nms(batch.tensor, conf, iou, max_det)
        return self._infer(batch.tensor)

    def rows(self, preds, conf: list[float], iou: list[float], max_det: list[int]) -> list[Rows]:
        """Stage 3: the engine's output → rows per image (letterboxed model coordinates)."""
        return self.postprocessor(preds, conf, iou, max_det)

    def to_detections(self, rows: Sequence[Rows], geoms: Sequence[Letterbox],
                      sizes: Sequence[tuple[int, int]]) -> list[DetectionArray]:
        """Stage 4: the rows of each image (letterboxed coordinates), its letterbox and original
        ``(h, w)`` → its detections in original pixels with names (array-backed sequences: no
        Python object per box until one is read). One pass over the boxes of all images."""
        boxes = unletterbox_many([r[0] for r in rows], list(geoms), list(sizes))
        names = self.card.names
        return [DetectionArray.from_rows(b, r[1], r[2], names) for b, r in zip(boxes, rows, strict=True)]

    # --- detection ----------------------------------------------------------------------
    def detect(
        self,
        images: Sequence[ImageInput],
        uris: Sequence[str] | None = None,
        *,
        conf: float | Sequence[float] | None = None,
        iou: float | Sequence[float] | None = None,
        max_det: int | Sequence[int] | None = None,
    ) -> list[ImageResult]:
        """Detect in ``images`` (encoded bytes, uint8 arrays in BGR like OpenCV, or on the GPU
        path RGB ``[3, h, w]`` uint8 device tensors). Bad inputs become results with ``error``
        set; the others are unaffected. ``conf``/``iou``/``max_det`` are one value for all
        images or one per image (the online endpoint shares one engine call between requests
        with different values). Each result's ``speed`` holds the call's milliseconds per image
        by stage."""
        return self.detect_timed(images, uris, conf=conf, iou=iou, max_det=max_det)[0]

    def detect_timed(
        self,
        images: Sequence[ImageInput],
        uris: Sequence[str] | None = None,
        *,
        conf: float | Sequence[float] | None = None,
        iou: float | Sequence[float] | None = None,
        max_det: int | Sequence[int] | None = None,
        stream_priority: int = 0,
    ) -> tuple[list[ImageResult], Timings]:
        """:meth:`detect`, and the call's :class:`Timings`. ``stream_priority``: the CUDA stream
        priority of the call's data path on a GPU (lower runs first; clamped to the device's
        range: the online endpoint gives its calls the highest)."""
        with self._thread_stream(stream_priority):
            return self._detect_timed(images, uris, conf, iou, max_det)

    @contextlib.contextmanager
    def _thread_stream(self, priority: int = 0):
        """On a CUDA engine, a stream of the calling thread's own for the data path (decode,
        letterbox, NMS; the engine joins it): concurrent calls (an actor's threads, Serve's
        worker threads) overlap on the GPU in one context, and each call's waits for the GPU
        wait only for its own work, not for the other threads' on the default stream. It
        starts after what the caller queued (device-tensor inputs such as decoded video
        frames) and is finished when the call returns."""
        if not str(self.engine.device).startswith("cuda"):
            yield
            return
        import torch

        dev = torch.device(self.engine.device)
        streams = getattr(self._streams, "by_priority", None)
        if streams is None:
            streams = self._streams.by_priority = {}
        stream = streams.get(priority)
        if stream is None:
            stream = streams[priority] = torch.cuda.Stream(dev, priority=priority)
        stream.wait_stream(torch.cuda.current_stream(dev))
        try:
            with torch.cuda.stream(stream):
                yield
        finally:
            stream.synchronize()

    def _detect_timed(self, images, uris, conf, iou, max_det) -> tuple[list[ImageResult], Timings]:
        cfg = self.config
        n = len(images)
        conf = _per_image(cfg.conf if conf is None else conf, n, "conf")
        iou = _per_image(cfg.iou if iou is None else iou, n, "iou")
        max_det = _per_image(cfg.max_det if max_det is None else max_det, n, "max_det")
        uris = list(uris) if uris is not None else [f"#{i}" for i in range(n)]
        if len(uris) != n:
            raise ValueError(f"{n} images but {len(uris)} uris")
        t = Timings(images=n, decoders={})
        results = [ImageResult(uri=u) for u in uris]
        starts = list(range(0, n, self.chunk))
        # overlap only where the engine call is asynchronous (the GPU): on the CPU the engine
        # already uses every core
        overlap = self.overlap and str(self.engine.device).startswith("cuda")

        def prepare(s: int) -> PreparedBatch:
            t0 = time.perf_counter()
            p = self.prepare(images[s : s + self.chunk])
            t.decode += time.perf_counter() - t0
            with self._counters_lock:  # calls may run at once (an actor's threads, Serve's)
                for k in ("h2d_bytes", "nvjpeg", "cpu_decoded"):
                    self.gpu_counters[k] += getattr(p, k)
            for name, c in p.decoder_counts().items():
                t.decoders[name] = t.decoders.get(name, 0) + c
            return p

        nxt = prepare(0) if starts else None
        for k, s in enumerate(starts):
            p, nxt = nxt, None
            for j, (err, size) in enumerate(zip(p.errors, p.sizes, strict=True)):
                if err is not None:
                    results[s + j].fail(err, (p.kinds[j] if p.kinds else None) or "input")
                elif size is not None:
                    results[s + j].height, results[s + j].width = size
            ids = [s + r for r in p.rows]
            c, u, m = [conf[i] for i in ids], [iou[i] for i in ids], [max_det[i] for i in ids]
            preds = None
            t1 = time.perf_counter()
            if ids:
                try:
                    preds = self.infer(p, c, u, m)
                except Exception as e:
                    log.exception("engine failed on a batch of %d", len(ids))
                    for i in ids:
                        results[i].fail(f"inference failed: {type(e).__name__}: {e}", "engine")
            t2 = time.perf_counter()
            if overlap and k + 1 < len(starts):
                nxt = prepare(starts[k + 1])  # the host's part of chunk k+1 while the GPU runs chunk k
            if preds is not None:
                t3 = time.perf_counter()
                dev = getattr(preds, "device", None)
                if dev is not None and getattr(dev, "type", None) == "cuda":  # the GPU's share: inference
                    import torch

                    torch.cuda.current_stream(dev).synchronize()
                    t2 += time.perf_counter() - t3
                    t3 = time.perf_counter()
                try:
                    rows = self.rows(preds, c, u, m)
                    dets = self.to_detections(rows, p.geoms, [(results[i].height, results[i].width) for i in ids])
                    for i, d in zip(ids, dets, strict=True):
                        results[i].detections = d
                except Exception as e:
                    log.exception("postprocessing failed on a batch of %d", len(ids))
                    for i in ids:
                        results[i].fail(f"inference failed: {type(e).__name__}: {e}", "engine")
                t.infer += t2 - t1
                t.postprocess += time.perf_counter() - t3
                t.batches += 1
            if nxt is None and k + 1 < len(starts):
                nxt = prepare(starts[k + 1])
        speed = t.speed()
        for r in results:
            r.speed = speed
        return results, t

    # --- Ray Data -----------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """``map_batches`` entry: ``{"bytes": [...], "path": [...]}`` → result rows."""
        paths = [self.uri_prefix + str(p) for p in batch["path"]]
        results = self.detect(list(batch["bytes"]), paths)
        return self.to_table(results)

    @property
    def identity(self) -> ModelIdentity:
        """The model and engine behind this detector's rows and responses."""
        return ModelIdentity(sha256=self.card.sha256, url=self.card.url, engine=self.engine.name,
                             precision=self.engine.precision)

    def to_table(self, results: list[ImageResult]) -> pa.Table:
        return results_to_table(results, self.identity)
