"""The engine interface: one module per runtime behind this small base class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from raydetect.config import DetectorConfig
from raydetect.errors import RaydetectError
from raydetect.model_card import ModelCard
from raydetect.types import NMSOutput

__all__ = ["Engine", "EngineUnavailableError", "NMSOutput"]


class EngineUnavailableError(RaydetectError, RuntimeError):
    """The runtime an engine needs is not installed or has no device here."""


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
