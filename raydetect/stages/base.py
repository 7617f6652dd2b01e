"""The detector's stages, each chosen on its own (Ultralytics' predictor splits its work the
same way: preprocess, inference, postprocess, each timed):

* a **preprocessor** turns inputs (encoded bytes or pixel arrays) into a letterboxed batch on
  the engine's device: :class:`CpuPreprocessor` (decode and letterbox in NumPy/OpenCV, a float32
  NCHW array) or :class:`raydetect.stages.gpu_preprocess.GpuPreprocessor` (header checks on the host,
  then batched JPEG decode and letterbox on the GPU: only the compressed bytes cross PCIe);
* the **engine** (:mod:`raydetect.engines`) declares its device and input kind and whether it
  returns the raw head or rows after its own NMS;
* a **postprocessor** turns the engine's output into rows per image: :class:`NumpyNMS`,
  :class:`TorchNMS` (batched on the GPU, one device→host copy per chunk) or :class:`EngineRows`
  (the engine ran NMS).

:func:`choose_stages` is the rule: the preprocessor follows the engine's input kind (torch
tensors: the GPU data path, TensorRT included), the postprocessor the engine's output.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from raydetect.stages.postprocess import nms_output_rows, postprocess
from raydetect.stages.preprocess import (
    ImageError,
    Letterbox,
    as_bgr,
    decode_image,
    error_kind,
    letterbox,
    to_tensor,
)
from raydetect.types import HeadLayout, NMSOutput

#: One image's rows: boxes xyxy [k, 4] float32 (letterboxed model pixels), scores [k] float32,
#: class ids [k] int64.
Rows = tuple[np.ndarray, np.ndarray, np.ndarray]


class StageChoice(NamedTuple):
    preprocess: str  # "cpu" | "gpu"
    postprocess: str  # "numpy" | "torch" | "engine"


def choose_stages(input_kind: str, nms_in_engine: bool) -> StageChoice:
    """Stages for an engine that takes ``input_kind`` batches (``"numpy"`` or ``"torch"``) and
    does (or does not) run NMS inside. Torch-input engines (the torch engine and TensorRT) get
    the GPU data path whatever their output; NMS runs where the engine's output is."""
    pre = "gpu" if input_kind == "torch" else "cpu"
    if nms_in_engine:
        post = "engine"
    else:
        post = "torch" if input_kind == "torch" else "numpy"
    return StageChoice(pre, post)


@dataclass
class PreparedBatch:
    """A letterboxed batch on the engine's device, and what happened to each input."""

    tensor: Any  # [k, 3, H, W]: NumPy float32 (CPU) or a torch tensor on the device; None if k = 0
    rows: list[int]  # input positions of the tensor's rows
    geoms: list[Letterbox]  # per row
    sizes: list[tuple[int, int] | None]  # per input: original (height, width)
    errors: list[str | None]  # per input
    decoder: list[str | None] = field(default_factory=list)  # per input: "nvimgcodec", "nvjpeg", "cpu"
    h2d_bytes: int = 0  # bytes this batch uploaded: encoded bytes for GPU decoders, pixels otherwise
    nvjpeg: int = 0  # images decoded on the GPU (nvImageCodec or torchvision's nvJPEG)
    cpu_decoded: int = 0  # images decoded on the CPU (fallbacks and non-JPEG)
    notes: list[str] = field(default_factory=list)
    kinds: list[str | None] = field(default_factory=list)  # per input: the error's ErrorKind

    def fail(self, i: int, e: BaseException) -> None:
        """Input ``i`` could not be prepared: its error text and kind (the CPU path's texts)."""
        if isinstance(e, ImageError):
            self.errors[i] = str(e)
        else:  # a decoder bug must not kill the batch
            self.errors[i] = f"decode failed: {type(e).__name__}: {e}"
        if len(self.kinds) != len(self.errors):
            self.kinds = [None] * len(self.errors)
        self.kinds[i] = error_kind(e)

    def decoder_counts(self) -> dict[str, int]:
        return dict(Counter(d for d in self.decoder if d))


class CpuPreprocessor:
    """Decode (OpenCV/Pillow, with the checks of :mod:`raydetect.stages.preprocess`) and letterbox on
    the host; the batch is a float32 NCHW array."""

    device = "cpu"

    def __init__(self, imgsz: tuple[int, int], max_pixels: int, max_bytes: int) -> None:
        self.imgsz = imgsz
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    def decode(self, img: Any) -> np.ndarray:
        if isinstance(img, np.ndarray) and img.ndim in (2, 3):
            return as_bgr(img)  # pixels; 1-D uint8 arrays are encoded bytes
        data = img if isinstance(img, bytes) else bytes(img)
        return decode_image(data, self.max_pixels, self.max_bytes)

    def prepare(self, images) -> PreparedBatch:
        n = len(images)
        res = PreparedBatch(None, [], [], [None] * n, [None] * n, [None] * n)
        h, w = self.imgsz
        boxed = []
        for i, img in enumerate(images):
            try:
                arr = self.decode(img)
                res.sizes[i] = arr.shape[:2]
                b, g = letterbox(arr, h, w)
            except Exception as e:  # ImageError, or a decoder bug: it must not kill the batch
                res.fail(i, e)
                continue
            res.rows.append(i)
            res.geoms.append(g)
            res.decoder[i] = "cpu"
            boxed.append(b)
        res.cpu_decoded = len(boxed)
        if boxed:
            res.tensor = to_tensor(boxed)
        return res


# --- postprocessors: engine output of a chunk -> rows per image ------------------------------


class NumpyNMS:
    """Raw head → rows with the NumPy NMS (:func:`raydetect.stages.postprocess.postprocess`), per image."""

    name = "numpy"

    def __init__(self, layout: HeadLayout) -> None:
        self.layout = layout

    def __call__(self, preds, conf: list[float], iou: list[float], max_det: list[int]) -> list[Rows]:
        preds = np.asarray(preds)
        return [postprocess(preds[j], self.layout, conf[j], iou[j], max_det[j]) for j in range(len(conf))]


class TorchNMS:
    """Raw head (a device tensor) → rows with batched NMS on the device
    (:func:`raydetect.stages.gpu_postprocess.batched_postprocess`), one call per distinct
    (conf, iou, max_det) among the images."""

    name = "torch"

    def __init__(self, layout: HeadLayout) -> None:
        self.layout = layout

    def __call__(self, preds, conf: list[float], iou: list[float], max_det: list[int]) -> list[Rows]:
        from raydetect.stages.gpu_postprocess import batched_postprocess

        groups: dict[tuple[float, float, int], list[int]] = {}
        for j in range(len(conf)):
            groups.setdefault((float(conf[j]), float(iou[j]), int(max_det[j])), []).append(j)
        out: list[Any] = [None] * len(conf)
        for (c, u, m), js in groups.items():
            part = preds if len(groups) == 1 else preds[js]
            for j, r in zip(js, batched_postprocess(part, self.layout, c, u, m), strict=True):
                out[j] = r
        return out


class EngineRows:
    """The engine ran NMS (:class:`NMSOutput`): keep each image's rows above its conf, at most
    its max_det (:func:`raydetect.stages.postprocess.nms_output_rows`)."""

    name = "engine"

    def __call__(self, preds: NMSOutput, conf: list[float], iou: list[float], max_det: list[int]) -> list[Rows]:
        return [nms_output_rows(preds, j, conf[j], max_det[j]) for j in range(len(conf))]


def make_postprocessor(kind: str, layout: HeadLayout):
    if kind == "engine":
        return EngineRows()
    if kind == "torch":
        return TorchNMS(layout)
    return NumpyNMS(layout)
