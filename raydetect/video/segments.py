"""Pure planning: time segments of a stream and frame sampling, all in integer PTS.

Every decision here depends only on integer presentation timestamps (PTS, in the stream's
``time_base``) and exact fractions, never on floats or on where a segment starts, so that a
video cut into segments gives exactly the frames (and the sampled frames) of one sequential pass:

* segment ``k`` owns the frames with ``start_k <= pts < end_k``; the first segment has no lower
  bound and the last no upper bound, so every frame belongs to exactly one segment even when the
  container's duration is wrong or some PTS are below the stream start;
* the frame index is ``round((pts - origin) * time_base * fps)`` (global, not per segment);
* ``--fps F`` keeps a frame when it is the first frame at or after a sampling instant
  ``origin + k / F``, i.e. when ``floor(t * F)`` increases from the previous frame's to its own;
* ``--every N`` keeps the frames whose index is a multiple of ``N``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction


def as_fraction(x: float | int | Fraction) -> Fraction:
    """An exact fraction for a user-given number (0.1 → 1/10, not the binary float)."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, int):
        return Fraction(x)
    return Fraction(repr(float(x)))


def _round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


@dataclass(frozen=True, slots=True)
class Segment:
    """Frames with ``start <= pts < end`` (``None``: unbounded on that side)."""

    index: int
    start: int | None
    end: int | None

    def contains(self, pts: int) -> bool:
        return (self.start is None or pts >= self.start) and (self.end is None or pts < self.end)


def segment_length_pts(segment_s: float | Fraction, time_base: Fraction) -> int:
    """Length of a segment in PTS ticks (at least 1)."""
    return max(1, _round_half_up(as_fraction(segment_s) / time_base))


def plan_segments(
    origin: int, end_pts: int | None, time_base: Fraction, segment_s: float | Fraction
) -> list[Segment]:
    """Cut ``[origin, end_pts)`` into segments of ``segment_s`` seconds.

    Boundaries are ``origin + k * L`` with ``L`` the segment length in ticks. The first segment
    is open below and the last open above. A remainder shorter than a quarter of ``L`` joins the
    last full segment (a 601 s file cut at 150 s gives 4 segments, not 4 and a 1 s one: a segment
    costs a seek, a decoder start and a place in an actor's batch, and a tail of a few frames would
    add a wave of calls to a job whose segments otherwise fill its actors' slots exactly). With an
    unknown ``end_pts`` (no duration in the headers) the whole stream is one segment."""
    length = segment_length_pts(segment_s, time_base)
    if end_pts is None or end_pts <= origin:
        return [Segment(0, None, None)]
    n = max(1, math.ceil((end_pts - origin) / length))
    if n > 1 and 4 * (end_pts - origin - (n - 1) * length) < length:
        n -= 1
    return [
        Segment(k, None if k == 0 else origin + k * length, None if k == n - 1 else origin + (k + 1) * length)
        for k in range(n)
    ]


def frame_index(pts: int, origin: int, time_base: Fraction, fps: Fraction) -> int:
    """Global frame number of the frame at ``pts``: ``round((pts - origin) * time_base * fps)``."""
    return _round_half_up((pts - origin) * time_base * fps)


class Sampler:
    """Which decoded frames are kept: all of them, ``fps`` per second, or ``every`` N-th.

    ``keep(pts, prev_pts)`` needs the PTS of the frame just before (in presentation order),
    which the segment decoder provides even for the first frame of a segment (it decodes from
    the keyframe before the segment start). ``prev_pts=None`` means "the first frame of the
    stream", which is always kept."""

    def __init__(
        self,
        origin: int,
        time_base: Fraction,
        stream_fps: Fraction,
        *,
        fps: float | Fraction | None = None,
        every: int | None = None,
    ) -> None:
        if fps is not None and every is not None:
            raise ValueError("set fps or every, not both")
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1 (got {every})")
        self.origin = origin
        self.time_base = time_base
        self.stream_fps = stream_fps
        self.fps = as_fraction(fps) if fps is not None else None
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0 (got {fps})")
        self.every = every

    def index(self, pts: int) -> int:
        return frame_index(pts, self.origin, self.time_base, self.stream_fps)

    def _slot(self, pts: int) -> int:
        assert self.fps is not None
        return math.floor((pts - self.origin) * self.time_base * self.fps)

    def keep(self, pts: int, prev_pts: int | None) -> bool:
        if self.fps is not None:
            return prev_pts is None or self._slot(pts) > self._slot(prev_pts)
        if self.every is not None:
            return self.index(pts) % self.every == 0
        return True
