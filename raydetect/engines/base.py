"""The engine interface: one module per runtime behind this small base class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from raydetect.config import DetectorConfig
from raydetect.model_card import ModelCard


class EngineUnavailableError(RuntimeError):
    """The runtime an engine needs is not installed or has no device here."""


@dataclass(frozen=True)
class NMSOutput:
    """Final detections of a batch from an engine that runs NMS inside its network
    (``Engine.nms_in_engine``). Host NumPy arrays (they are small: ``B x K``):

    * ``num`` ``[B]`` int64: valid rows per image (the first ``num[i]`` rows of image ``i``);
    * ``boxes`` ``[B, K, 4]`` float32: x1, y1, x2, y2 in letterboxed model-input pixels;
    * ``scores`` ``[B, K]`` float32, highest first within an image;
    * ``classes`` ``[B, K]`` int64 class ids.

    Rows past ``num[i]`` are padding. The detector maps rows to detections with
    :func:`raydetect.postprocess.nms_output_rows` (no NMS of its own).
    """

    num: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __post_init__(self) -> None:
        b = self.num.shape[0]
        if self.boxes.ndim != 3 or self.boxes.shape[0] != b or self.boxes.shape[2] != 4:
            raise ValueError(f"NMSOutput.boxes must be [{b}, K, 4], got {self.boxes.shape}")
        k = self.boxes.shape[1]
        for name in ("scores", "classes"):
            shape = getattr(self, name).shape
            if shape != (b, k):
                raise ValueError(f"NMSOutput.{name} must be [{b}, {k}], got {shape}")

    def __len__(self) -> int:
        return int(self.num.shape[0])


class Engine(ABC):
    """Runs a YOLO graph on a batch of letterboxed NCHW float tensors.

    ``infer`` takes a batch in the engine's ``input_kind`` (``"numpy"`` arrays for CPU
    engines, ``"torch"`` CUDA tensors for GPU engines) and returns the raw head output
    ``[B, ...]`` in the same kind; the detector decodes and runs NMS.
    """

    name: ClassVar[str]
    input_kind: ClassVar[str] = "numpy"
    #: True for engines whose network ends in NMS: ``infer`` returns :class:`NMSOutput`.
    nms_in_engine: ClassVar[bool] = False

    def __init__(self, card: ModelCard, config: DetectorConfig) -> None:
        self.card = card
        self.config = config
        self.precision: str = config.precision
        self.device: str = "cpu"
        #: Largest batch one ``infer`` call accepts (None: any).
        self.max_batch: int | None = None

    @classmethod
    def availability(cls) -> str | None:
        """None if the engine can run here, else the reason it cannot."""
        return None

    @classmethod
    def availability_for(cls, config: DetectorConfig) -> str | None:
        """Like :meth:`availability`, for this config (e.g. a GPU engine asked to run on
        ``device='cpu'`` for tests needs no GPU)."""
        return cls.availability()

    @abstractmethod
    def infer(self, batch: Any) -> Any:
        """Raw head output for a batch ``[B, 3, H, W]``."""

    def metadata(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "precision": self.precision,
            "device": self.device,
            "max_batch": self.max_batch,
            "model_sha256": self.card.sha256,
        }

    def set_nms_params(self, conf: float, iou: float, max_det: int) -> None:  # noqa: B027
        """Engines with NMS inside (``nms_in_engine``) apply these thresholds in the next
        ``infer`` calls, or raise ``ValueError`` naming what they cannot honour."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources."""
