"""Motion gating: skip frames that barely differ from the last *processed* frame.

Each sampled frame is reduced to a small grey thumbnail (``width`` pixels wide, area
interpolation). Its score is the mean absolute difference, in grey levels 0–255, to the
thumbnail of the last frame sent to the detector. Below ``threshold`` the frame is skipped
(its detections are taken to be those of that processed frame); at or above it, it is processed.
Comparing with the last *processed* frame (not the previous frame) means slow drift accumulates
until it crosses the threshold, and a forced refresh every ``refresh`` frames bounds how long
detections can be carried over at all.

The gate is reset at every segment start, so the first frame of a segment is always processed:
segments are decoded independently (possibly on different machines) and must not depend on
each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


def grey_thumbnail(grey: np.ndarray, width: int) -> np.ndarray:
    """``grey`` (H×W uint8 luma) scaled to ``width`` pixels wide, as float32."""
    h, w = grey.shape[:2]
    height = max(1, round(h * width / w))
    small = cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)
    return small.astype(np.float32)


@dataclass(slots=True)
class GateDecision:
    process: bool
    score: float | None  # None for the first frame after a reset (nothing to compare with)
    forced: bool = False


class MotionGate:
    def __init__(self, threshold: float, refresh: int, width: int = 64) -> None:
        if threshold < 0:
            raise ValueError(f"threshold must be >= 0 (got {threshold})")
        if refresh < 1:
            raise ValueError(f"refresh must be >= 1 (got {refresh})")
        self.threshold = float(threshold)
        self.refresh = int(refresh)
        self.width = int(width)
        self.reset()

    def reset(self) -> None:
        self._ref: np.ndarray | None = None
        self._since = 0  # frames seen since the last processed one

    def decide(self, thumb: np.ndarray) -> GateDecision:
        """Decide for the next sampled frame, given its :func:`grey_thumbnail`."""
        if self._ref is None or self._ref.shape != thumb.shape:
            self._ref, self._since = thumb, 0
            return GateDecision(True, None)
        score = float(np.abs(thumb - self._ref).mean())
        self._since += 1
        if score >= self.threshold:
            self._ref, self._since = thumb, 0
            return GateDecision(True, score)
        if self._since >= self.refresh:
            self._ref, self._since = thumb, 0
            return GateDecision(True, score, forced=True)
        return GateDecision(False, score)
