"""One segment of one video → frame rows: plan, decode, sample, gate, detect.

:func:`plan_video` probes a video and returns its :class:`SegmentTask` s (a probe failure is one
task carrying the error). :func:`detect_segment` runs one task with a
:class:`~raydetect.detector.Detector` in the calling process — decoding and detection happen in
the same process, so decoded pixels never travel — and returns the rows and counters.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from raydetect.config import StorageConfig, VideoConfig
from raydetect.storage import filesystem, is_remote_fs
from raydetect.types import FrameResult, ImageResult
from raydetect.video.decode import DecodeStats, Selected, iter_segment_frames, select_frames, truncation_error
from raydetect.video.gate import MotionGate
from raydetect.video.probe import REMOTE_BLOCK_SIZE, VideoError, VideoInfo, open_video, stream_info
from raydetect.video.segments import Sampler, Segment, plan_segments

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentTask:
    """One Ray Data row of the video pipeline: a segment of a probed video (or a probe error)."""

    uri: str
    segment: Segment
    segments: int
    info: VideoInfo | None = None
    error: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "uri": self.uri,
                "segment": asdict(self.segment),
                "segments": self.segments,
                "info": None if self.info is None else self.info.as_dict(),
                "error": self.error,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> SegmentTask:
        d = json.loads(text)
        info = None if d["info"] is None else VideoInfo(**d["info"])
        return cls(d["uri"], Segment(**d["segment"]), d["segments"], info, d["error"])


def plan_video(uri: str, video: VideoConfig, storage: StorageConfig | None = None) -> list[SegmentTask]:
    """Probe ``uri`` and cut it into segments of ``video.segment_s`` seconds."""
    try:
        with open_video(uri, storage) as (container, stream):
            info = stream_info(uri, container, stream)
    except VideoError as e:
        return [SegmentTask(uri, Segment(0, None, None), 1, None, str(e))]
    except Exception as e:  # a bug or an unexpected FFmpeg condition: one error row, not a failed job
        log.exception("probing %s failed", uri)
        return [SegmentTask(uri, Segment(0, None, None), 1, None, f"probe failed: {type(e).__name__}: {e}")]
    segs = plan_segments(info.origin, info.end_pts, info.time_base, video.segment_s)
    return [SegmentTask(uri, s, len(segs), info) for s in segs]


@dataclass
class SegmentOutcome:
    rows: list[FrameResult]
    stats: dict[str, Any] = field(default_factory=dict)


def _frame_row(task: SegmentTask, sel: Selected, result: ImageResult, ref: int | None) -> FrameResult:
    info = task.info
    assert info is not None
    return FrameResult(
        result=result,
        segment=task.segment.index,
        frame=sel.index,
        pts=sel.frame.pts,
        pts_s=float(sel.frame.pts * info.time_base),
        skipped=not sel.decision.process,
        ref_frame=ref,
        motion=sel.decision.score,
    )


def _error_row(task: SegmentTask, message: str, pts: int | None = None) -> FrameResult:
    pts_s = None
    if pts is not None and task.info is not None:
        pts_s = float(pts * task.info.time_base)
    return FrameResult(result=ImageResult(uri=task.uri, error=message), segment=task.segment.index, pts=pts, pts_s=pts_s)


def _where(task: SegmentTask, pts: int | None) -> str:
    if pts is None or task.info is None:
        return ""
    return f" at {float(pts * task.info.time_base):.3f} s"


@contextlib.contextmanager
def _frames_of(task: SegmentTask, decoder: str, storage: StorageConfig | None, dstats: DecodeStats):
    """The frame iterator of the chosen decoder for ``task``'s segment."""
    if decoder == "nvdec":
        from raydetect.video.nvdec import iter_segment_frames_nvdec

        info = task.info
        assert info is not None
        fs, path = filesystem(task.uri, storage)
        kwargs = {"block_size": REMOTE_BLOCK_SIZE, "cache_type": "readahead"} if is_remote_fs(fs) else {}
        with fs.open(path, "rb", **kwargs) as f:
            yield iter_segment_frames_nvdec(f, task.segment, info.time_base, info.frame_pts, info.end_pts, dstats)
        return
    with open_video(task.uri, storage) as (container, stream):
        yield iter_segment_frames(container, stream, task.segment, dstats)


def detect_segment(
    detector,
    task: SegmentTask,
    video: VideoConfig,
    storage: StorageConfig | None = None,
    *,
    decoder: str = "cpu",
) -> SegmentOutcome:
    """Decode ``task``'s segment, sample and gate its frames and detect in the processed ones."""
    info = task.info
    stats: dict[str, Any] = {
        "uri": task.uri,
        "segment": task.segment.index,
        "segments": task.segments,
        "codec": info.codec if info else None,
        "width": info.width if info else None,
        "height": info.height if info else None,
        "fps": float(info.fps) if info else None,
        "duration_s": info.duration_s if info else None,
        "frames_decoded": 0,
        "frames_sampled": 0,
        "frames_processed": 0,
        "frames_skipped": 0,
        "detections": 0,
        "errors": 0,
        "decode_s": 0.0,
        "infer_s": 0.0,
        "decoder": decoder,
        "error": None,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }
    if task.error is not None or info is None:
        rows = [_error_row(task, task.error or "no stream information")]
        stats.update(errors=1, error=rows[0].error)
        return SegmentOutcome(rows, stats)

    sampler = Sampler(info.origin, info.time_base, info.fps, fps=video.fps, every=video.every)
    gate = MotionGate(video.gate_threshold, video.gate_refresh, video.gate_width) if video.gate else None
    dstats = DecodeStats()
    counters = {"sampled": 0}
    rows: list[FrameResult] = []
    pending: list[tuple[Selected, Any]] = []
    last_processed: int | None = None
    convert_s = 0.0
    infer_s = 0.0
    batch = max(1, detector.config.batch_size)

    def flush() -> None:
        nonlocal infer_s
        if not pending:
            return
        t0 = time.perf_counter()
        results = detector.detect([a for _, a in pending], [task.uri] * len(pending))
        infer_s += time.perf_counter() - t0
        for (sel, _), res in zip(pending, results, strict=True):
            rows.append(_frame_row(task, sel, res, None))
        pending.clear()

    fatal: str | None = None
    try:
        with _frames_of(task, decoder, storage, dstats) as frames:
            for sel in select_frames(frames, sampler, gate, counters):
                if not sel.decision.process:
                    res = ImageResult(uri=task.uri, width=sel.frame.width, height=sel.frame.height)
                    rows.append(_frame_row(task, sel, res, last_processed))
                    continue
                t0 = time.perf_counter()
                pixels = sel.frame.bgr()
                convert_s += time.perf_counter() - t0
                pending.append((sel, pixels))
                last_processed = sel.index
                if len(pending) >= batch:
                    flush()
    except VideoError as e:
        fatal = str(e)
    except Exception as e:  # an unexpected decoder failure: an error row, the job goes on
        log.exception("segment %d of %s failed", task.segment.index, task.uri)
        fatal = f"video decode failed: {type(e).__name__}: {e}"
    flush()

    # Damage met while decoding before the start (from the keyframe) or after the end (lookahead)
    # belongs to the neighbouring segment, which reports it.
    events = [ev for ev in dstats.errors if ev.pts is None or task.segment.contains(ev.pts)]
    for ev in events:
        more = f" ({ev.packets} packets)" if ev.packets > 1 else ""
        rows.append(_error_row(task, f"{ev.message}{more}{_where(task, ev.pts)}", ev.pts))
    trunc = truncation_error(dstats, task.segment, info.end_pts, info.frame_pts, info.time_base)
    if trunc is not None and not events:
        # where the data ends, or the segment start when the segment has none of its data
        ends = None if dstats.max_pts is None else math.floor(dstats.max_pts + info.frame_pts)
        rows.append(_error_row(task, trunc, ends if ends is not None and task.segment.contains(ends)
                               else task.segment.start))
    if fatal is not None:
        rows.append(_error_row(task, fatal))
    rows.sort(key=lambda r: (r.pts is None, r.pts if r.pts is not None else 0, r.frame is None))

    errors = [r for r in rows if r.error is not None]
    stats.update(
        frames_decoded=dstats.frames,
        frames_sampled=counters["sampled"],
        frames_processed=sum(1 for r in rows if r.frame is not None and not r.skipped),
        frames_skipped=sum(1 for r in rows if r.skipped),
        detections=sum(len(r.result.detections) for r in rows),
        errors=len(errors),
        decode_s=dstats.seconds + convert_s,
        infer_s=infer_s,
        error=errors[0].error if errors else None,
    )
    return SegmentOutcome(rows, stats)
