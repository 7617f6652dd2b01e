"""The Detector: encoded images (or arrays) in batches → :class:`ImageResult` per image.

It is the callable class Ray Data's ``map_batches`` runs in an actor pool, and the
model behind the Serve deployment. One detector holds one model card and one engine.
"""

from __future__ import annotations

import logging
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from raydetect.config import DetectorConfig, validate
from raydetect.engines import create_engine
from raydetect.engines.base import NMSOutput
from raydetect.model_card import ModelCard, batching_check_input
from raydetect.postprocess import nms_output_rows, nms_outputs_close, postprocess
from raydetect.preprocess import (
    ImageError,
    Letterbox,
    as_bgr,
    decode_image,
    letterbox,
    to_tensor,
    unletterbox_boxes,
)
from raydetect.types import Detection, ImageResult, results_to_table

log = logging.getLogger(__name__)

ImageInput = bytes | bytearray | memoryview | np.ndarray


@dataclass
class Timings:
    """Seconds spent in each stage by the last :meth:`Detector.detect` call."""

    decode: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0
    images: int = 0
    batches: int = 0

    def as_dict(self) -> dict[str, float]:
        return {
            "decode_ms": self.decode * 1e3,
            "infer_ms": self.infer * 1e3,
            "postprocess_ms": self.postprocess * 1e3,
            "images": self.images,
            "batches": self.batches,
        }


def _per_image(value, n: int, name: str) -> list:
    """One value for every image, or a sequence of exactly ``n`` values."""
    if isinstance(value, numbers.Number):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"{n} images but {len(values)} values of {name}")
    return values


#: Largest relative difference (max |Δ| / max |output|) between an image run alone and
#: inside a batch that still counts as "the rewritten graph batches correctly".
BATCH_CHECK_TOLERANCE = {"fp32": 1e-3, "fp16": 1e-2, "int8": 1e-2}


class Detector:
    """Detect objects in batches of images with one engine.

    ``Detector(config)`` loads the model (from a path or s3:// URL), picks the engine,
    verifies batching when the graph was rewritten to a dynamic batch and warms up.
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
        self.batching_verified = self._verify_batching()
        self.timings = Timings()
        #: The GPU data path (decode, letterbox and NMS in torch on the engine's device) for
        #: engines that take torch tensors and return the raw head; None: the CPU path.
        self.gpu = self._gpu_preprocessor()
        #: GPU path: decode chunk k+1 while the GPU runs chunk k (within one ``detect`` call).
        self.overlap = True
        #: GPU path totals: bytes this detector uploaded, images decoded by nvJPEG / the CPU.
        self.gpu_counters = {"h2d_bytes": 0, "nvjpeg": 0, "cpu_decoded": 0}

    # --- identity -----------------------------------------------------------------------
    @property
    def names(self) -> dict[int, str]:
        return self.card.names

    def info(self) -> dict[str, Any]:
        return {
            **self.card.summary(),
            **self.engine.metadata(),
            "batch_size": self.chunk,
            "batching_verified": self.batching_verified,
        }

    def _verify_batching(self) -> bool:
        """Run one image alone and inside a batch; on mismatch fall back to chunks of 1.
        Doubles as the warm-up."""
        x = batching_check_input(self.card.imgsz, n=2)
        if self.engine.nms_in_engine:
            return self._verify_batching_nms(x)
        alone = np.asarray(self._infer(x[:1]))
        if not self.card.batch_rewritten or self.chunk == 1:
            return True
        both = np.asarray(self._infer(x))
        err = np.abs(both[:1] - alone).max() / max(float(np.abs(alone).max()), 1e-6)
        # Reduced precisions legitimately differ between batch sizes (other kernels, other
        # accumulation order): FP16 by ~1e-3 of the output range on the H200.
        tol = BATCH_CHECK_TOLERANCE.get(self.engine.precision, 1e-2)
        if not np.isfinite(err) or err > tol:
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

    def _infer_nms(self, x: np.ndarray, conf: list[float], iou: list[float], max_det: list[int]) -> NMSOutput:
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
        """Detect in ``images`` (encoded bytes or uint8 arrays, BGR like OpenCV).
        Bad inputs become results with ``error`` set; the others are unaffected.
        ``conf``/``iou``/``max_det`` are one value for all images or one per image (the
        online endpoint shares one engine call between requests with different values)."""
        cfg = self.config
        conf = _per_image(cfg.conf if conf is None else conf, len(images), "conf")
        iou = _per_image(cfg.iou if iou is None else iou, len(images), "iou")
        max_det = _per_image(cfg.max_det if max_det is None else max_det, len(images), "max_det")
        uris = list(uris) if uris is not None else [f"#{i}" for i in range(len(images))]
        if len(uris) != len(images):
            raise ValueError(f"{len(images)} images but {len(uris)} uris")
        t = Timings(images=len(images))
        results = [ImageResult(uri=u) for u in uris]
        h, w = self.card.imgsz
        if self.gpu is not None:
            self._detect_gpu(images, results, conf, iou, max_det, t)
            self.timings = t
            return results

        ready: list[tuple[int, np.ndarray, Letterbox]] = []
        t0 = time.perf_counter()
        for i, img in enumerate(images):
            try:
                arr = self._decode(img)
                results[i].height, results[i].width = arr.shape[:2]
                boxed, geom = letterbox(arr, h, w)
                ready.append((i, boxed, geom))
            except ImageError as e:
                results[i].error = str(e)
            except Exception as e:  # a decoder bug must not kill the batch
                results[i].error = f"decode failed: {type(e).__name__}: {e}"
        t.decode = time.perf_counter() - t0

        for start in range(0, len(ready), self.chunk):
            part = ready[start : start + self.chunk]
            t1 = time.perf_counter()
            try:
                x = to_tensor([p[1] for p in part])
                if self.engine.nms_in_engine:
                    ids = [p[0] for p in part]
                    preds = self._infer_nms(x, [conf[i] for i in ids], [iou[i] for i in ids], [max_det[i] for i in ids])
                else:
                    preds = np.asarray(self._infer(x))
            except Exception as e:
                log.exception("engine failed on a batch of %d", len(part))
                for i, _, _ in part:
                    results[i].error = f"inference failed: {type(e).__name__}: {e}"
                continue
            t2 = time.perf_counter()
            for j, (i, _, geom) in enumerate(part):
                oh, ow = results[i].height, results[i].width
                if isinstance(preds, NMSOutput):  # NMS ran inside the engine
                    boxes, scores, cls = nms_output_rows(preds, j, conf[i], max_det[i])
                    results[i].detections = self._rows_to_detections(boxes, scores, cls, geom, oh, ow)
                else:
                    results[i].detections = self._to_detections(preds[j], geom, oh, ow, conf[i], iou[i], max_det[i])
            t.infer += t2 - t1
            t.postprocess += time.perf_counter() - t2
            t.batches += 1
        self.timings = t
        return results

    # --- GPU path -----------------------------------------------------------------------
    def _gpu_preprocessor(self):
        if self.engine.input_kind != "torch" or self.engine.nms_in_engine:
            return None
        from raydetect.gpu_preprocess import GpuPreprocessor

        return GpuPreprocessor(
            self.card.imgsz,
            self.engine.device,
            dtype=getattr(self.engine, "dtype", None),
            max_pixels=self.config.max_pixels,
            max_bytes=self.config.max_bytes,
        )

    def _detect_gpu(
        self,
        images: Sequence[ImageInput],
        results: list[ImageResult],
        conf: list[float],
        iou: list[float],
        max_det: list[int],
        t: Timings,
    ) -> None:
        """Decode + letterbox (nvJPEG, torch) → engine → batched NMS, all on the GPU; boxes
        come back once per chunk. With ``overlap`` the next chunk is decoded while the GPU
        runs the current one (the engine call returns before the GPU finishes)."""
        starts = list(range(0, len(images), self.chunk))

        def prepare(s: int):
            t0 = time.perf_counter()
            p = self.gpu.prepare(images[s : s + self.chunk])
            t.decode += time.perf_counter() - t0
            for k in ("h2d_bytes", "nvjpeg", "cpu_decoded"):
                self.gpu_counters[k] += getattr(p, k)
            return p

        nxt = prepare(0) if starts else None
        for k, s in enumerate(starts):
            p, nxt = nxt, None
            for j, (err, size) in enumerate(zip(p.errors, p.sizes, strict=True)):
                if err is not None:
                    results[s + j].error = err
                elif size is not None:
                    results[s + j].height, results[s + j].width = size
            ids = [s + r for r in p.rows]
            preds = None
            t1 = time.perf_counter()
            if ids:
                try:
                    preds = self.engine.infer(p.tensor)
                except Exception as e:
                    log.exception("engine failed on a batch of %d", len(ids))
                    for i in ids:
                        results[i].error = f"inference failed: {type(e).__name__}: {e}"
            if self.overlap and k + 1 < len(starts):
                nxt = prepare(starts[k + 1])
            if preds is not None:
                t2 = time.perf_counter()
                rows = self._gpu_rows(preds, ids, conf, iou, max_det)
                for i, geom, (boxes, scores, cls) in zip(ids, p.geoms, rows, strict=True):
                    results[i].detections = self._rows_to_detections(
                        boxes, scores, cls, geom, results[i].height, results[i].width
                    )
                t.infer += t2 - t1
                t.postprocess += time.perf_counter() - t2
                t.batches += 1
            if nxt is None and k + 1 < len(starts):
                nxt = prepare(starts[k + 1])

    def _gpu_rows(self, preds, ids: list[int], conf: list[float], iou: list[float], max_det: list[int]):
        """Batched GPU NMS, one call per distinct (conf, iou, max_det) among the images."""
        from raydetect.gpu_postprocess import batched_postprocess

        groups: dict[tuple[float, float, int], list[int]] = {}
        for j, i in enumerate(ids):
            groups.setdefault((float(conf[i]), float(iou[i]), int(max_det[i])), []).append(j)
        out: list[Any] = [None] * len(ids)
        for (c, u, m), js in groups.items():
            part = preds if len(groups) == 1 else preds[js]
            for j, r in zip(js, batched_postprocess(part, self.card.layout, c, u, m), strict=True):
                out[j] = r
        return out

    def _decode(self, img: ImageInput) -> np.ndarray:
        if isinstance(img, np.ndarray) and img.ndim in (2, 3):
            return as_bgr(img)  # pixels; 1-D uint8 arrays are encoded bytes
        data = img if isinstance(img, bytes) else bytes(img)
        return decode_image(data, self.config.max_pixels, self.config.max_bytes)

    def _to_detections(
        self, pred: np.ndarray, geom: Letterbox, oh: int, ow: int, conf: float, iou: float, max_det: int
    ) -> list[Detection]:
        boxes, scores, cls = postprocess(pred, self.card.layout, conf, iou, max_det)
        return self._rows_to_detections(boxes, scores, cls, geom, oh, ow)

    def _rows_to_detections(
        self, boxes: np.ndarray, scores: np.ndarray, cls: np.ndarray, geom: Letterbox, oh: int, ow: int
    ) -> list[Detection]:
        """Boxes in letterboxed coordinates → detections in original pixels with names."""
        boxes = unletterbox_boxes(boxes, geom, oh, ow)
        names = self.card.names
        return [
            Detection(
                float(b[0]), float(b[1]), float(b[2]), float(b[3]), float(s), int(c), names.get(int(c), str(c))
            )
            for b, s, c in zip(boxes, scores, cls, strict=True)
        ]

    # --- Ray Data -----------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """``map_batches`` entry: ``{"bytes": [...], "path": [...]}`` → result rows."""
        paths = [self.uri_prefix + str(p) for p in batch["path"]]
        results = self.detect(list(batch["bytes"]), paths)
        return self.to_table(results)

    def to_table(self, results: list[ImageResult]) -> pa.Table:
        return results_to_table(
            results,
            model_sha256=self.card.sha256,
            engine=self.engine.name,
            precision=self.engine.precision,
        )
