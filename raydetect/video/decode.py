"""Decode the frames of one segment, then sample and gate them.

:func:`iter_segment_frames` seeks to the keyframe before the segment start
(``container.seek(start - 1, backward=True, any_frame=False)``), decodes forward, drops the
frames before the start (remembering the last one's PTS: the sampler needs it) and stops a few
frames after the end (decoders may emit slightly out of PTS order). Decode errors do not raise:
they are collected in :class:`DecodeStats` with the PTS where the damage was met, decoding goes
on with the next packet, and the frames before (and after) the damage are kept.

:func:`select_frames` applies the sampler and the motion gate and yields what to do with each
frame; the caller converts only the frames it processes to full-size BGR pixels.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Protocol

import numpy as np

from raydetect.video.gate import GateDecision, MotionGate, grey_thumbnail
from raydetect.video.probe import _msg
from raydetect.video.segments import Sampler, Segment

log = logging.getLogger(__name__)

#: Frames decoded past the segment end before stopping (covers out-of-order PTS output).
LOOKAHEAD = 16
#: Error events in one segment after which the segment is abandoned.
MAX_ERRORS = 20
#: A stream ending this long before its header duration is reported as truncated.
TRUNCATION_TOLERANCE_S = Fraction(1)


class FrameLike(Protocol):
    """A decoded frame of any decoder (PyAV on the CPU, NVDEC)."""

    pts: int
    width: int
    height: int

    def bgr(self) -> np.ndarray: ...

    def grey(self) -> np.ndarray: ...

    def thumbnail(self, width: int) -> np.ndarray: ...


class AvFrame:
    """A PyAV frame; pixels are converted only on request."""

    __slots__ = ("frame", "pts", "width", "height")

    def __init__(self, frame, pts: int) -> None:
        self.frame = frame
        self.pts = pts
        self.width = frame.width
        self.height = frame.height

    def bgr(self) -> np.ndarray:
        return self.frame.to_ndarray(format="bgr24")

    def grey(self) -> np.ndarray:
        return self.frame.to_ndarray(format="gray")

    def thumbnail(self, width: int) -> np.ndarray:
        return grey_thumbnail(self.grey(), width)


class AvPacketDecoder:
    """PyAV's decoder of a stream as a *packet decoder*: ``decode(packet)`` → ``[(pts, frame,
    corrupt)]`` (``pts`` None: the frame has no timestamp; ``frame`` a :class:`FrameLike`).
    :class:`raydetect.video.nvdec.NvdecPacketDecoder` is the GPU one."""

    name = "cpu"

    def __init__(self, stream) -> None:
        self.stream = stream

    def decode(self, packet) -> list[tuple[int | None, FrameLike | None, bool]]:
        out = []
        for fr in packet.decode():
            pts = fr.pts if fr.pts is not None else fr.dts
            out.append((pts, None if pts is None else AvFrame(fr, pts), bool(fr.is_corrupt)))
        return out


class _NvdecAdapter:
    """:class:`~raydetect.video.nvdec.NvdecPacketDecoder` with :class:`AvPacketDecoder`'s output."""

    name = "nvdec"

    def __init__(self, stream) -> None:
        from raydetect.video.nvdec import NvdecPacketDecoder

        self.dec = NvdecPacketDecoder(stream)

    def decode(self, packet) -> list[tuple[int | None, FrameLike | None, bool]]:
        return [(f.pts, f, False) for f in self.dec.decode(packet)]


#: ``decoder`` name → packet-decoder factory (called with the stream, once per decode attempt)
PACKET_DECODERS = {"cpu": AvPacketDecoder, "nvdec": _NvdecAdapter}


@dataclass(slots=True)
class DecodeEvent:
    """Damage met while decoding: the PTS where it was met (None if unknown) and the error."""

    pts: int | None
    message: str
    packets: int = 1


@dataclass
class DecodeStats:
    frames: int = 0  # frames of this segment (start <= pts < end) that were decoded
    extra: int = 0  # frames decoded outside the segment (from the keyframe, and the lookahead)
    corrupt: int = 0  # frames the decoder flagged as corrupt (kept)
    seconds: float = 0.0  # time spent demuxing, decoding and converting pixels
    max_pts: int | None = None  # highest PTS decoded (any frame, in or out of the segment)
    eof: bool = False  # the data ended before the segment end was seen
    errors: list[DecodeEvent] = field(default_factory=list)

    def add_error(self, pts: int | None, message: str, *, merge: bool) -> None:
        last = self.errors[-1] if self.errors else None
        if merge and last is not None and last.message == message:
            last.packets += 1
            return
        self.errors.append(DecodeEvent(pts, message))


def _seek(container, stream, target: int | None) -> None:
    """Seek to the keyframe at or before ``target`` (None: the file start) and flush the decoder."""
    import av

    try:
        if target is None:
            container.seek(0)
        else:
            container.seek(target, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError as e:
        # No index or a broken one: decoding from the current position is slower but still
        # exact, as frames are assigned by PTS.
        log.warning("seek to pts %s failed (%s); decoding from the current position", target, _msg(e))
    stream.codec_context.flush_buffers()


def iter_segment_frames(
    container, stream, segment: Segment, stats: DecodeStats, *, thread_type: str = "SLICE",
    decoder: str = "cpu",
) -> Iterator[tuple[FrameLike, int | None]]:
    """Yield ``(frame, prev_pts)`` for the frames of ``segment`` in presentation order;
    ``prev_pts`` is the PTS of the frame decoded just before (None at the stream start).

    PyAV demuxes (and seeks) for every decoder; ``decoder`` picks what decodes the packets:
    ``cpu`` (PyAV, frames on the host) or ``nvdec`` (:mod:`raydetect.video.nvdec`, frames in
    GPU memory with the PTS of their packets, i.e. PyAV's). A NVDEC failure (unsupported
    stream, decoder error) raises: the caller decodes the segment again on the CPU.

    Some containers index keyframes by decode time (AVI with B-frames), so a seek can land on a
    keyframe *after* the segment start, whose leading B-frames cannot be decoded. That is
    detected (the first decoded frame is not before the start) and the seek is retried from
    further back, one second then doubling, and finally from the file start."""
    import av

    # Slice threading only: frame threading ("FRAME"/"AUTO") hides decode errors and drops the
    # frames in flight at the damage (measured with PyAV 18 on a truncated H.264 MP4), and was
    # not faster on 640x360 H.264 here.
    stream.thread_type = thread_type
    start, end = segment.start, segment.end
    time_base = Fraction(stream.time_base.numerator, stream.time_base.denominator)
    step = max(1, math.ceil(1 / time_base))
    origin = stream.start_time if stream.start_time is not None else 0
    target = None if start is None else start - 1
    from_file_start = start is None
    factory = PACKET_DECODERS[decoder]
    while True:
        t0 = time.perf_counter()
        if start is not None:
            _seek(container, stream, None if from_file_start else target)
        dec = factory(stream)  # a fresh decoder (NVDEC session) per attempt
        prev: int | None = None
        beyond = 0
        overshot = False
        clean_since_error = True
        demux = container.demux(stream)
        stats.seconds += time.perf_counter() - t0
        while not overshot:
            t0 = time.perf_counter()
            try:
                packet = next(demux)
            except StopIteration:
                stats.eof = True
                stats.seconds += time.perf_counter() - t0
                break
            except av.FFmpegError as e:
                stats.add_error(prev, f"demux error: {_msg(e)}", merge=False)
                stats.eof = True
                stats.seconds += time.perf_counter() - t0
                break
            try:
                frames = dec.decode(packet)
            except av.FFmpegError as e:
                stats.seconds += time.perf_counter() - t0
                pts = packet.pts if packet.pts is not None else prev
                stats.add_error(pts, f"decode error: {_msg(e)}", merge=not clean_since_error)
                clean_since_error = False
                if len(stats.errors) >= MAX_ERRORS:
                    stats.add_error(pts, f"{MAX_ERRORS} decode errors: rest of the segment abandoned", merge=False)
                    return
                continue
            stats.seconds += time.perf_counter() - t0
            for pts, fr, corrupt in frames:
                if pts is None:
                    stats.add_error(prev, "decoded frame without a timestamp (dropped)", merge=True)
                    continue
                clean_since_error = True
                stats.max_pts = pts if stats.max_pts is None else max(stats.max_pts, pts)
                if start is not None and pts < start:
                    stats.extra += 1
                    prev = pts
                    continue
                if prev is None and not from_file_start:
                    overshot = True  # nothing before the start was decoded: seek again, earlier
                    stats.extra += 1
                    break
                if end is not None and pts >= end:
                    stats.extra += 1
                    beyond += 1
                    continue
                stats.frames += 1
                stats.corrupt += corrupt
                yield fr, prev
                prev = pts
            if beyond >= LOOKAHEAD:
                return
        if not overshot:
            return
        assert target is not None
        target -= step
        step *= 2
        if target < origin:
            from_file_start = True
        stats.eof = False


def truncation_error(
    stats: DecodeStats, segment: Segment, end_pts: int | None, frame_pts: Fraction, time_base: Fraction
) -> str | None:
    """The error to report when the data ended well before the duration the headers give."""
    if not stats.eof or end_pts is None:
        return None
    if segment.end is not None and stats.max_pts is not None and stats.max_pts >= segment.end:
        return None
    tolerance = TRUNCATION_TOLERANCE_S / time_base
    reached = None if stats.max_pts is None else stats.max_pts + frame_pts
    if reached is not None and reached >= end_pts - tolerance:
        return None
    header_s = float(end_pts * time_base)
    if reached is None:
        return f"no decodable frames: the headers give a duration of {header_s:.3f} s (truncated or damaged?)"
    return (
        f"video data ends at {float(reached * time_base):.3f} s but the headers give "
        f"{header_s:.3f} s: truncated or damaged"
    )


@dataclass(slots=True)
class Selected:
    """What to do with one sampled frame."""

    frame: FrameLike
    index: int
    decision: GateDecision


def select_frames(
    frames: Iterator[tuple[FrameLike, int | None]],
    sampler: Sampler,
    gate: MotionGate | None,
    counters: dict[str, int],
) -> Iterator[Selected]:
    """Apply sampling, then gating (reset at the call: a segment starts with a processed frame)."""
    if gate is not None:
        gate.reset()
    for frame, prev in frames:
        if not sampler.keep(frame.pts, prev):
            continue
        counters["sampled"] += 1
        decision = GateDecision(True, None)
        if gate is not None:  # the thumbnail is computed where the frame is (GPU frames: on the GPU)
            decision = gate.decide(frame.thumbnail(gate.width))
        yield Selected(frame, sampler.index(frame.pts), decision)
