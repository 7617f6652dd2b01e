"""Ray Data wiring of the video path of the batch job.

    uris ──from_items──▶ flat_map(plan_video) ──repartition(1 row/block)──▶
        map_batches(VideoSegmentDetector, ActorPoolStrategy, batch_size=video.sessions) ──▶ segment stats

* one row per (video, segment): a long video keeps as many actors busy as it has segments;
* each actor holds one :class:`~raydetect.detector.Detector` and takes ``video.sessions``
  segments per call: it decodes them at once (one thread, and on NVDEC one decoder session,
  each) from the file objects (fsspec, range reads) and fills its engine batches with the
  frames of all of them, in the same process (:func:`~raydetect.video.detect.detect_segments`);
* the decoder is chosen once per actor (:func:`resolve_decoder`: ``auto`` takes NVDEC when the
  actor has a GPU and PyNvVideoCodec works) and falls back to the CPU per segment; the reason is
  in the segment's and the video's ``decoder_reason``;
* each segment's frame rows are written by the actor to
  ``OUTPUT/_videos/<name>-<hash>-s<segment>.parquet`` — a deterministic name per (video, segment),
  so a retried segment replaces its file instead of adding rows (exactly once by construction);
* the per-segment counters come back to the driver, which writes one row per video to
  ``OUTPUT/_video_summary/summary.parquet``.

Image results stay at the top of ``OUTPUT`` with their own schema; the video folders start with
``_`` so that ``pyarrow.dataset.dataset(OUTPUT)`` (which skips ``_*`` and ``.*``) reads the image
rows alone. :func:`raydetect.read_results` reads all three.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raydetect.config import DetectorConfig, JobConfig, StorageConfig, VideoConfig
from raydetect.job import output as sh
from raydetect.resources import initial_actors
from raydetect.storage import filesystem, to_uri, write_bytes_atomic
from raydetect.types import VIDEO_SUMMARY_SCHEMA, frame_results_to_table
from raydetect.video.detect import SegmentTask, detect_segments, plan_video

log = logging.getLogger(__name__)

#: under OUTPUT; ``_``-prefixed so that pyarrow.dataset skips them (raydetect/job/results.py reads
#: these and the names before 2026-12, ``videos``/``video_summary``)
FRAMES_DIR = "_videos"
SUMMARY_DIR = "_video_summary"

SEGMENT_STATS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("segment", pa.int32()),
        ("segments", pa.int32()),
        ("codec", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fps", pa.float64()),
        ("duration_s", pa.float64()),
        ("frames_decoded", pa.int64()),
        ("frames_sampled", pa.int64()),
        ("frames_processed", pa.int64()),
        ("frames_skipped", pa.int64()),
        ("detections", pa.int64()),
        ("errors", pa.int64()),
        ("decode_s", pa.float64()),
        ("infer_s", pa.float64()),
        ("decoder", pa.string()),
        ("decoder_reason", pa.string()),
        ("error", pa.string()),
        ("worker", pa.string()),
        ("started", pa.float64()),  # wall clock (Unix s) when the actor started the segment
        ("finished", pa.float64()),
        ("file", pa.string()),
        ("model_sha256", pa.string()),
        ("engine", pa.string()),
        ("precision", pa.string()),
        ("resumed", pa.bool_()),
    ]
)
SEGMENT_META_KEY = b"raydetect.video_segment"


def frames_file_name(uri: str, segment: int) -> str:
    """Deterministic file name of a segment's frame rows."""
    stem = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem)[:40] or "video"
    digest = hashlib.sha1(uri.encode()).hexdigest()[:16]
    return f"{stem}-{digest}-s{segment:06d}.parquet"


def resolve_decoder(choice: str, num_gpus: float, availability=None) -> tuple[str, str]:
    """``(decoder, reason)`` for a ``video.decoder`` choice in an actor with ``num_gpus``:
    ``nvdec`` when asked for (``nvdec``, or ``auto`` in an actor with a GPU) and
    :func:`~raydetect.video.nvdec.nvdec_availability` says yes, else ``cpu`` and why.
    ``availability``: that function (tests pass another)."""
    if choice == "cpu":
        return "cpu", "requested"
    if choice == "auto" and num_gpus <= 0:
        return "cpu", "auto: no GPU assigned to the actor"
    if availability is None:
        from raydetect.video.nvdec import nvdec_availability as availability
    ok, reason = availability()
    if ok:
        return "nvdec", reason
    if choice == "nvdec":
        log.warning("nvdec requested but unavailable (%s); decoding on the CPU", reason)
    return "cpu", f"NVDEC unavailable: {reason}"


class VideoSegmentDetector:
    """``map_batches`` callable: ``video.sessions`` segment tasks per call → their counters
    (one row each)."""

    def __init__(
        self, config: DetectorConfig, video: VideoConfig, output: str, num_gpus: float = 0.0
    ) -> None:
        from raydetect.detector import Detector

        self.detector = Detector(config)
        self.video = video
        self.storage = config.storage
        self.out_fs, out_path = filesystem(output, config.storage)
        self.frames_dir = f"{out_path.rstrip('/')}/{FRAMES_DIR}"
        self.out_fs.makedirs(self.frames_dir, exist_ok=True)
        self.decoder, self.decoder_reason = resolve_decoder(video.decoder, num_gpus)
        from raydetect.job.metrics import JobMetrics

        self.metrics = JobMetrics(output)  # frames / detections / errors counters of the job

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        tasks = [SegmentTask.from_json(str(text)) for text in batch["task"]]
        stats = self.run_many(tasks)
        return pa.Table.from_pylist(stats, schema=SEGMENT_STATS_SCHEMA)

    def run(self, task: SegmentTask) -> dict[str, Any]:
        return self.run_many([task])[0]

    def run_many(self, tasks: list[SegmentTask]) -> list[dict[str, Any]]:
        out: list[dict[str, Any] | None] = [None] * len(tasks)
        todo: list[int] = []
        for k, task in enumerate(tasks):
            path = f"{self.frames_dir}/{frames_file_name(task.uri, task.segment.index)}"
            done = read_segment_stats(self.out_fs, path)
            if done is not None:  # written by an earlier run of the same job (the manifest says so)
                out[k] = {**done, "resumed": True}
            else:
                todo.append(k)
        if todo:
            reason = None if self.decoder == "nvdec" else self.decoder_reason
            outcomes = detect_segments(self.detector, [tasks[k] for k in todo], self.video, self.storage,
                                       decoder=self.decoder, decoder_reason=reason)
            for k, outcome in zip(todo, outcomes, strict=True):
                out[k] = self._write(tasks[k], outcome)
        return out  # type: ignore[return-value]

    def _write(self, task: SegmentTask, outcome) -> dict[str, Any]:
        name = frames_file_name(task.uri, task.segment.index)
        model = self.detector.identity
        stats = {**outcome.stats, "file": name, **model.columns(), "resumed": False}
        table = frame_results_to_table(outcome.rows, model)
        table = table.replace_schema_metadata({SEGMENT_META_KEY: json.dumps(stats)})
        write_bytes_atomic(self.out_fs, f"{self.frames_dir}/{name}", sh.table_to_parquet_bytes(table))
        self.metrics.record(table)
        return stats


def read_segment_stats(fs, path: str) -> dict[str, Any] | None:
    """The counters stored in a segment's frames file, or None when there is no complete file."""
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        return json.loads(meta[SEGMENT_META_KEY])
    except Exception as e:  # unreadable or foreign file: compute the segment again
        log.warning("ignoring %s: %s", path, e)
        return None


#: How :func:`raydetect.video.segments.plan_segments` cuts a file, in the manifest: segment
#: files are named by index, so a job resumed under another rule could lose or repeat the frames of
#: a file's tail; outputs written before the rule existed (2026-12-07) are refused on resume.
SEGMENT_TAIL = "a remainder under a quarter of segment_s joins the last segment"


def video_settings(video: VideoConfig) -> dict[str, Any]:
    """The video options that change the results (recorded in the job manifest: resuming with
    other values is refused), and the segmenting rule. The decoder choice and the sessions per
    actor are left out: CPU and NVDEC decode the same frames, in any grouping."""
    return {**video.model_dump(mode="json", exclude={"decoder", "sessions"}), "segment_tail": SEGMENT_TAIL}


def _plan_rows(row: dict[str, Any], video: VideoConfig, storage: StorageConfig) -> list[dict[str, Any]]:
    tasks = plan_video(row["uri"], video, storage)
    return [{"uri": t.uri, "segment": t.segment.index, "task": t.to_json()} for t in tasks]


def build_video_dataset(cfg: JobConfig, uris: list[str]):
    """The lazy Ray Dataset of per-segment counters (frame rows are written by the actors)."""
    import ray

    ds = ray.data.from_items([{"uri": u} for u in uris])
    ds = ds.flat_map(
        _plan_rows, fn_kwargs={"video": cfg.video, "storage": cfg.detector.storage}, num_cpus=0.1
    )
    # One segment per block, so the segments of one video spread over the actor pool.
    ds = ds.repartition(target_num_rows_per_block=1)
    max_size = cfg.concurrency
    # as many actors at once as the videos keep busy (each has one segment or more), not
    # min_actors: the pool would add the rest one at a time, each seconds after the last
    initial = initial_actors(cfg, len(uris), ray.available_resources().get("CPU", 0.0),
                             rows_per_call=cfg.video.sessions, spare_cpus=1)
    return ds.map_batches(
        VideoSegmentDetector,
        fn_constructor_kwargs={
            "config": cfg.detector,
            "video": cfg.video,
            "output": cfg.output,
            "num_gpus": cfg.num_gpus,
        },
        batch_size=cfg.video.sessions,
        batch_format="numpy",
        # one call (``sessions`` segments, tens of seconds) at a time per actor: a call queued
        # behind a busy actor would wait while another actor idles
        compute=ray.data.ActorPoolStrategy(min_size=min(cfg.min_actors, max_size), max_size=max_size,
                                           initial_size=initial, max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
    )


def summarize_videos(segment_rows: list[dict[str, Any]]) -> pa.Table:
    """One row per video (:data:`VIDEO_SUMMARY_SCHEMA`) from the per-segment counters."""
    by_uri: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in segment_rows:
        by_uri[r["uri"]].append(r)
    out = []
    sums = ("frames_decoded", "frames_sampled", "frames_processed", "frames_skipped", "detections", "errors",
            "decode_s", "infer_s")
    for uri in sorted(by_uri):
        segs = sorted(by_uri[uri], key=lambda r: r["segment"])
        first = segs[0]
        row = {k: sum(s[k] or 0 for s in segs) for k in sums}
        errors = [s["error"] for s in segs if s["error"]]
        row.update(
            uri=uri,
            codec=first["codec"],
            width=first["width"],
            height=first["height"],
            fps=first["fps"],
            duration_s=first["duration_s"],
            segments=len(segs),
            decode_fps=row["frames_decoded"] / row["decode_s"] if row["decode_s"] > 0 else None,
            decoder=",".join(sorted({s["decoder"] for s in segs})),
            decoder_reason="; ".join(sorted({s.get("decoder_reason") for s in segs} - {None})) or None,
            error=errors[0] if errors else None,
            model_sha256=first.get("model_sha256"),
            engine=first.get("engine"),
            precision=first.get("precision"),
        )
        out.append(row)
    return pa.Table.from_pylist(out, schema=VIDEO_SUMMARY_SCHEMA)


@dataclass
class VideoJobSummary:
    videos: int
    segments: int
    segments_resumed: int
    frames_decoded: int
    frames_processed: int
    frames_skipped: int
    detections: int
    errors: int
    seconds: float
    frames_output: str
    summary_output: str
    #: the per-segment counters (incl. which worker ran the segment); not part of as_dict()
    segment_rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def line(self, startup_s: float | None = None) -> str:
        """The summary line; ``startup_s``: the job's start-up before the videos ran (Ray
        mostly), counted in the time and named (a job of videos alone)."""
        fps = self.frames_decoded / self.seconds if self.seconds > 0 else 0.0
        took = (f"{self.seconds:.1f} s" if startup_s is None
                else f"{startup_s + self.seconds:.1f} s ({startup_s:.1f} s start-up)")
        return (
            f"raydetect: {self.videos} videos ({self.segments} segments) in {took}: "
            f"{self.frames_decoded} frames decoded ({fps:.1f}/s), {self.frames_processed} processed, "
            f"{self.frames_skipped} skipped by the gate, {self.detections} detections, {self.errors} errors "
            f"-> {self.frames_output}"
            + (f" (resumed: {self.segments_resumed} segments were done already)" if self.segments_resumed else "")
        )

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("segment_rows")
        return d


def run_video_job(cfg: JobConfig, in_fs, paths: list[str]) -> VideoJobSummary:
    """Run the video part of the batch job for ``paths`` on ``in_fs`` (Ray must be initialised).
    The output folder is expected to have been prepared (emptied) by the caller."""
    uris = [to_uri(in_fs, p) for p in paths]
    out = cfg.output.rstrip("/")
    t0 = time.perf_counter()
    segment_rows = build_video_dataset(cfg, uris).take_all()
    seconds = time.perf_counter() - t0
    table = summarize_videos(segment_rows)
    out_fs, out_path = filesystem(out, cfg.detector.storage)
    summary_dir = f"{out_path}/{SUMMARY_DIR}"
    out_fs.makedirs(summary_dir, exist_ok=True)
    write_bytes_atomic(out_fs, f"{summary_dir}/summary.parquet", sh.table_to_parquet_bytes(table))
    col = table.to_pydict()
    return VideoJobSummary(
        videos=table.num_rows,
        segments=len(segment_rows),
        segments_resumed=sum(1 for r in segment_rows if r["resumed"]),
        frames_decoded=sum(col["frames_decoded"]),
        frames_processed=sum(col["frames_processed"]),
        frames_skipped=sum(col["frames_skipped"]),
        detections=sum(col["detections"]),
        errors=sum(col["errors"]),
        seconds=seconds,
        frames_output=f"{out}/{FRAMES_DIR}",
        summary_output=f"{out}/{SUMMARY_DIR}",
        segment_rows=segment_rows,
    )


def split_videos(files: list[str], video: VideoConfig) -> tuple[list[str], list[str]]:
    """``(images, videos)``: the listed input files split by the video extensions."""
    exts = tuple(video.extensions)
    videos = [f for f in files if f.lower().endswith(exts)]
    return [f for f in files if not f.lower().endswith(exts)], videos
