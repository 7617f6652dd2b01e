"""Segments of videos → frame rows: plan, decode, sample, gate, detect.

:func:`plan_video` probes a video and returns its :class:`SegmentTask` s (a probe failure is one
task carrying the error). :func:`detect_segments` runs several tasks at once with one
:class:`~raydetect.detector.Detector` in the calling process — decoding and detection happen in
the same process, so decoded pixels never travel — and returns the rows and counters of each:
one thread per segment demuxes, decodes (PyAV, or NVDEC with one decoder session per segment),
samples and gates, and the calling thread fills the detector's batches with the frames of all
of them (as DeepStream batches one frame per source). On the GPU the frames stay on the device
(NVDEC → RGB tensor → the detector's GPU stage). A segment whose NVDEC decode fails is decoded
again on the CPU (its rows so far are dropped), with the reason in ``decoder_reason``.
:func:`detect_segment` is the one-segment call.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from raydetect.config import StorageConfig, VideoConfig
from raydetect.types import FrameResult, ImageResult
from raydetect.video.decode import DecodeStats, Selected, iter_segment_frames, select_frames, truncation_error
from raydetect.video.gate import MotionGate
from raydetect.video.probe import VideoError, VideoInfo, open_video, stream_info
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


class _Stop(Exception):
    """The consumer gave up: producer threads end."""


@dataclass(eq=False)
class _Run:
    """One segment being decoded and detected (state shared by its thread and the batcher)."""

    task: SegmentTask
    decoder: str
    reason: str | None
    stats: dict[str, Any]
    rows: list[FrameResult] = field(default_factory=list)
    dstats: DecodeStats = field(default_factory=DecodeStats)
    counters: dict[str, int] = field(default_factory=lambda: {"sampled": 0})
    last_processed: int | None = None
    convert_s: float = 0.0
    infer_s: float = 0.0
    fatal: str | None = None


def _initial_stats(task: SegmentTask, decoder: str, reason: str | None) -> dict[str, Any]:
    info = task.info
    return {
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
        "decoder_reason": reason,
        "error": None,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "started": time.time(),
        "finished": None,
    }


def _produce(run: _Run, video: VideoConfig, storage: StorageConfig | None, put, tensors: bool) -> None:
    """The segment's thread: decode, sample, gate; hand each sampled frame to the batcher.
    NVDEC failures restart the segment on the CPU (the batcher drops what it had of it)."""
    task, info = run.task, run.task.info
    assert info is not None
    attempts = ["cpu"] if run.decoder == "cpu" else [run.decoder, "cpu"]
    for dec in attempts:
        run.decoder = dec
        run.dstats, run.counters, run.convert_s = DecodeStats(), {"sampled": 0}, 0.0
        sampler = Sampler(info.origin, info.time_base, info.fps, fps=video.fps, every=video.every)
        gate = MotionGate(video.gate_threshold, video.gate_refresh, video.gate_width) if video.gate else None
        try:
            with open_video(task.uri, storage) as (container, stream):
                frames = iter_segment_frames(container, stream, task.segment, run.dstats, decoder=dec)
                for sel in select_frames(frames, sampler, gate, run.counters):
                    if not sel.decision.process:
                        put(("skip", run, sel, None))
                        continue
                    t0 = time.perf_counter()
                    # GPU frames go to a GPU detector as RGB device tensors; otherwise BGR on the host
                    pixels = sel.frame.rgb() if (tensors and dec == "nvdec") else sel.frame.bgr()
                    run.convert_s += time.perf_counter() - t0
                    put(("frame", run, sel, pixels))
            d = run.dstats
            if dec == "nvdec" and d.frames == 0 and d.extra == 0 and not d.errors:
                raise RuntimeError("NVDEC returned no frames")
        except _Stop:
            return
        except VideoError as e:
            run.fatal = str(e)
        except Exception as e:
            if dec != "cpu":  # decode the segment again on the CPU, and say why
                run.reason = f"NVDEC failed, decoded on the CPU: {type(e).__name__}: {e}"
                log.warning("segment %d of %s: %s", task.segment.index, task.uri, run.reason)
                put(("reset", run, None, None))
                continue
            log.exception("segment %d of %s failed", task.segment.index, task.uri)
            run.fatal = f"video decode failed: {type(e).__name__}: {e}"
        break
    put(("done", run, None, None))


def _finish(run: _Run) -> SegmentOutcome:
    """Error rows (damage, truncation, a fatal error), order by PTS, and the counters."""
    task, info, dstats, rows = run.task, run.task.info, run.dstats, run.rows
    assert info is not None
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
    if run.fatal is not None:
        rows.append(_error_row(task, run.fatal))
    rows.sort(key=lambda r: (r.pts is None, r.pts if r.pts is not None else 0, r.frame is None))
    errors = [r for r in rows if r.error is not None]
    run.stats.update(
        frames_decoded=dstats.frames,
        frames_sampled=run.counters["sampled"],
        frames_processed=sum(1 for r in rows if r.frame is not None and not r.skipped),
        frames_skipped=sum(1 for r in rows if r.skipped),
        detections=sum(len(r.result.detections) for r in rows),
        errors=len(errors),
        decode_s=dstats.seconds + run.convert_s,
        infer_s=run.infer_s,
        decoder=run.decoder,
        decoder_reason=run.reason,
        error=errors[0].error if errors else None,
        finished=time.time(),
    )
    return SegmentOutcome(rows, run.stats)


def detect_segments(
    detector,
    tasks: list[SegmentTask],
    video: VideoConfig,
    storage: StorageConfig | None = None,
    *,
    decoder: str = "cpu",
    decoder_reason: str | None = None,
) -> list[SegmentOutcome]:
    """Decode ``tasks``' segments at once (one thread, and with ``decoder='nvdec'`` one NVDEC
    session, each), sample and gate their frames and detect in the processed ones, in engine
    batches filled from all segments. Returns each task's rows and counters, in order."""
    runs = [_Run(t, decoder, decoder_reason, _initial_stats(t, decoder, decoder_reason)) for t in tasks]
    out: list[SegmentOutcome | None] = [None] * len(runs)
    live = []
    for k, run in enumerate(runs):
        if run.task.error is not None or run.task.info is None:
            rows = [_error_row(run.task, run.task.error or "no stream information")]
            run.stats.update(errors=1, error=rows[0].error, finished=time.time())
            out[k] = SegmentOutcome(rows, run.stats)
        else:
            live.append(run)
    if live:
        _run_batched(detector, live, video, storage)
        for k, run in enumerate(runs):
            if out[k] is None:
                out[k] = _finish(run)
    return out  # type: ignore[return-value]


def _run_batched(detector, runs: list[_Run], video: VideoConfig, storage: StorageConfig | None) -> None:
    batch = max(1, detector.config.batch_size)
    q: queue.Queue = queue.Queue(maxsize=2 * batch + len(runs))
    stop = threading.Event()

    def put(item) -> None:
        while True:
            if stop.is_set():
                raise _Stop
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    tensors = any(r.decoder != "cpu" for r in runs) and detector.gpu is not None
    threads = [threading.Thread(target=_produce, args=(r, video, storage, put, tensors), daemon=True,
                                name=f"video-seg-{r.task.segment.index}") for r in runs]
    pending: list[tuple[_Run, Selected, Any]] = []

    def flush() -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        results = detector.detect([p for _, _, p in pending], [r.task.uri for r, _, _ in pending])
        share = (time.perf_counter() - t0) / len(pending)
        for (run, sel, _), res in zip(pending, results, strict=True):
            run.rows.append(_frame_row(run.task, sel, res, None))
            run.infer_s += share
        pending.clear()

    for t in threads:
        t.start()
    active = len(threads)
    try:
        while active:
            try:
                kind, run, sel, pixels = q.get(timeout=0.02)
            except queue.Empty:
                flush()  # the decoders are behind: do not hold frames back for a full batch
                continue
            if kind == "frame":
                run.last_processed = sel.index
                pending.append((run, sel, pixels))
                if len(pending) >= batch:
                    flush()
            elif kind == "skip":
                res = ImageResult(uri=run.task.uri, width=sel.frame.width, height=sel.frame.height)
                run.rows.append(_frame_row(run.task, sel, res, run.last_processed))
            elif kind == "reset":  # the segment starts again on the CPU
                run.rows.clear()
                run.last_processed = None
                run.infer_s = 0.0
                pending[:] = [p for p in pending if p[0] is not run]
            elif kind == "done":
                active -= 1
        flush()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)


def detect_segment(
    detector,
    task: SegmentTask,
    video: VideoConfig,
    storage: StorageConfig | None = None,
    *,
    decoder: str = "cpu",
) -> SegmentOutcome:
    """Decode ``task``'s segment, sample and gate its frames and detect in the processed ones."""
    return detect_segments(detector, [task], video, storage, decoder=decoder)[0]
