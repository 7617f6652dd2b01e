"""The batch job: images from local paths or S3 → Ray Data → detector actor pool → Parquet.

Ray Data reads only the compressed bytes; decoding happens inside the detector actors,
so decoded pixels never travel between processes.

Output is exactly once and resumable (:mod:`raydetect.job.output`): the sorted inputs are cut into
shards, the driver consumes the result rows as they stream out of the actor pool and writes each
shard's ``part-<id>.parquet`` atomically once every input of the shard has its row (rows are a few
hundred bytes, so the driver is never the bottleneck; no shuffle, no barrier). A re-run skips the
shards whose part file exists.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from raydetect.config import JobConfig
from raydetect.errors import RaydetectError
from raydetect.job import output as sh
from raydetect.storage import (
    Location,
    StorageUnavailableError,
    normalise_url,
    read_bytes,
    scan_inputs,
    sha256_bytes,
    show,
    storage_failure,
    uri_prefix,
)
from raydetect.types import error_rows

log = logging.getLogger(__name__)


class JobStalledError(RaydetectError, TimeoutError):
    """No result arrived for ``stall_timeout_s``; the message is one line (what, how to resume)."""

    exit_code = 3


@dataclass
class JobSummary:
    images: int
    seconds: float  # running the image shards (images/s is over this); start-up not included
    detections: int
    errors: int
    output: str
    video: Any = None  # raydetect.video.pipeline.VideoJobSummary when the input held videos
    processed: int | None = None  # images run by this call (None: all of them)
    shards: int = 0  # shards of the image inputs
    shards_skipped: int = 0  # of those, done by an earlier run (resumed)
    duplicates_dropped: int = 0  # repeated rows from retried tasks, not written
    write_s: float = 0.0  # driver time spent writing part files (part of seconds)
    report: str | None = None  # OUTPUT/_report/report.json when written
    unreadable: int = 0  # input-like entries that could not be read (each has an error row)
    skipped: dict[str, int] = field(default_factory=dict)  # other entries, per extension
    #: before the shards ran: listing the input, reading the model, preparing the output,
    #: starting (or joining) Ray and waiting for actor resources
    startup_s: float = 0.0
    #: the whole command, set by the CLI (start-up, shards, videos, report); None: start-up + seconds
    total_s: float | None = None

    @property
    def images_per_s(self) -> float:
        n = self.images if self.processed is None else self.processed
        return n / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        # the wall time the user waited, and how much of it was start-up (Ray mostly)
        total = self.total_s if self.total_s is not None else self.startup_s + self.seconds
        text = (
            f"raydetect: {self.images} images in {total:.1f} s "
            f"({self.startup_s:.1f} s start-up, {self.seconds:.1f} s detecting: {self.images_per_s:.1f} images/s), "
            f"{self.detections} detections, {self.errors} errors -> {self.output}"
        )
        if self.shards_skipped:
            text += (
                f" (resumed: {self.shards_skipped} of {self.shards} shards were done already, "
                f"{self.processed} images run now)"
            )
        if self.skipped:
            text += "; skipped (not inputs): " + ", ".join(f"{n} {ext}" for ext, n in sorted(self.skipped.items()))
        if self.video is None:
            return text
        return self.video.line(self.startup_s) if self.images == 0 else f"{text}\n{self.video.line()}"

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}


def read_blocks(files: int, rows_per_call: int, actors: int, max_files_per_block: int = 256) -> list[tuple[slice, int]]:
    """How to cut ``files`` inputs into blocks of paths: ``(files slice, blocks)`` pairs, the
    slice cut into ``blocks`` equal blocks. Every block but the last holds a whole number of
    detector calls (``rows_per_call`` files each), so the calls get full batches: Ray Data
    splits each block into calls on its own, and the default blocks of its binary-file reader
    (12 files each for 240 photos, 200 each for 40,000 files) gave calls of 8+4 and
    64+64+64+8. At least 4 blocks per actor where there are enough files, so the actors share
    the work evenly; at most ``max_files_per_block`` files (or one call) in a block."""
    calls = files // rows_per_call
    per_block = max(1, min(max_files_per_block // rows_per_call, calls // (4 * actors)))
    whole = calls // per_block * per_block * rows_per_call  # files in full blocks
    out = [(slice(0, whole), whole // (per_block * rows_per_call))] if whole else []
    if files > whole:
        out.append((slice(whole, files), 1))
    return out


def read_inputs(files: list[str], rows_per_call: int, actors: int):
    """The lazy Ray Dataset of ``{"path"}`` rows for ``files``, in blocks cut by
    :func:`read_blocks`. The detector actors read the files themselves (``read_batch``: the
    GETs of a call run concurrently on object storage, where Ray Data's binary reader fetched
    each read task's files one after another; no read tasks compete with the actors for CPUs;
    a file that cannot be read becomes an error row)."""
    import pyarrow as pa
    import ray

    tables = []
    for part, blocks in read_blocks(len(files), rows_per_call, actors):
        chunk = files[part]
        size = -(-len(chunk) // blocks)
        tables += [pa.table({"path": pa.array(chunk[i:i + size], pa.string())}) for i in range(0, len(chunk), size)]
    return ray.data.from_arrow(tables)


def build_dataset(cfg: JobConfig, files: list[str], fs, serve_info: dict | None = None):
    """The lazy Ray Dataset of result rows for ``files`` on ``fs`` (through the Serve app's
    replicas when ``cfg.via_serve``; ``serve_info`` is what they reported)."""
    import ray

    rows = cfg.rows_per_call or cfg.detector.batch_size
    ds = read_inputs(files, rows, cfg.concurrency)
    from raydetect.job.metrics import MeteredDetector
    from raydetect.resources import initial_actors

    max_size = cfg.concurrency
    min_size = min(cfg.min_actors, max_size)
    initial = initial_actors(cfg, len(files), ray.available_resources().get("CPU", 0.0))
    threads = {}
    if cfg.actor_concurrency > 1:  # calls run in threads: one decodes while another infers
        threads = {"max_concurrent_calls_per_actor": cfg.actor_concurrency, "enable_true_multi_threading": True}
    if cfg.via_serve is not None:
        from raydetect.job.via_serve import ServeCaller

        det = cfg.detector
        return ds.map_batches(
            ServeCaller,
            fn_constructor_kwargs={
                "app": cfg.via_serve,
                "model_sha256": serve_info["sha256"],
                # one archive batch = one archive-only engine call of a replica
                "sub_batch": serve_info.get("engine_batch_size") or serve_info["max_batch_size"],
                # what one handle call may carry (Serve's gRPC transport), as the replicas report it
                "max_request_bytes": serve_info.get("max_request_bytes"),
                "precision": serve_info.get("precision"),
                "conf": det.conf,
                "iou": det.iou,
                "max_det": det.max_det,
                "fs": fs,
                "uri_prefix": uri_prefix(fs),
                "job": cfg.output,
            },
            batch_size=rows,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=min_size, max_size=max_size, initial_size=initial, **threads),
            num_cpus=cfg.num_cpus,
        )
    return ds.map_batches(
        MeteredDetector,
        fn_constructor_kwargs={
            "config": cfg.detector,
            "fs": fs,
            "uri_prefix": uri_prefix(fs),
            "job": cfg.output,
        },
        batch_size=rows,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=min_size, max_size=max_size, initial_size=initial, **threads),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
    )


#: detector settings that change the rows; a re-run into the same output must match them
RESULT_SETTINGS = ("engine", "precision", "conf", "iou", "max_det", "max_pixels", "max_bytes")


def job_manifest(cfg: JobConfig, serve_info: dict | None = None) -> dict:
    """The manifest this job writes to ``OUTPUT/_job.json`` (reads the model to hash it).
    Through Serve (``serve_info``: what the replicas report) the engine, precision and limits
    are the replicas', and the app is recorded; their model must be the job's."""
    det = cfg.detector
    settings = {k: getattr(det, k) for k in RESULT_SETTINGS}
    settings["extensions"] = sorted(cfg.extensions)
    from raydetect.video.pipeline import video_settings

    settings["video"] = video_settings(cfg.video)
    model_sha256 = sha256_bytes(read_bytes(det.model, det.storage))
    if serve_info is not None:
        if serve_info["sha256"] != model_sha256:
            from raydetect.job.via_serve import ServeAppError

            raise ServeAppError(
                f"--via-serve {cfg.via_serve}: the application serves model sha256 {serve_info['sha256']} "
                f"({serve_info.get('url')}), but --model {det.model} is {model_sha256}; refusing to mix models"
            )
        settings.update({k: serve_info[k] for k in ("engine", "precision", "max_pixels", "max_bytes")})
    manifest = sh.make_manifest(
        model_sha256=model_sha256,
        input=normalise_url(cfg.input),
        settings=settings,
        shard_size=cfg.shard_size,
    )
    if serve_info is not None:
        manifest["via_serve"] = {"app": cfg.via_serve, "model_sha256": serve_info["sha256"],
                                 "engine": serve_info["engine"], "device": serve_info.get("device")}
    return manifest


def open_output(cfg: JobConfig, manifest: dict, overwrite: bool) -> sh.JobOutput:
    """The job's output, checked against ``manifest`` (or emptied with ``overwrite``), with the
    manifest recorded. Raises :class:`~raydetect.job.output.OutputMismatchError` (a
    ``FileExistsError``) when the output holds results of another job."""
    return sh.JobOutput.open(Location.of(cfg.output, cfg.detector.storage), manifest, overwrite=overwrite,
                             name=cfg.output)


class Heartbeat:
    """Logs "no progress for N s" every ``warn_s`` while nothing advances, whichever thread is
    blocked (a listing, a write, or the result stream); :meth:`idle` feeds the stall deadline."""

    def __init__(self, warn_s: float, where: str) -> None:
        self.warn_s = warn_s
        self.where = where
        self.phase = "starting"
        self.done = 0
        self.total = 0
        self.stalls = 0  # warning lines logged
        self._warned = 0  # since the last beat
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydetect-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def beat(self, phase: str | None = None, done: int | None = None) -> None:
        if phase is not None:
            self.phase = phase
        if done is not None:
            self.done = done
        self._warned = 0
        self._last = time.monotonic()

    def idle(self) -> float:
        return time.monotonic() - self._last

    def mute(self, phase: str) -> None:
        """Stop warning (a phase that reports its own progress, e.g. the video job)."""
        self.phase = phase
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(min(self.warn_s, 1.0)):
            idle = self.idle()
            if idle >= self.warn_s * (self._warned + 1):
                self._warned += 1
                self.stalls += 1
                log.warning("no progress for %.0f s while %s (%d of %d images done); waiting on %s",
                            idle, self.phase, self.done, self.total, self.where)


def _results(ds, stop: threading.Event, out: queue.Queue) -> None:
    """Producer thread: stream ``ds`` into ``out`` (a batch, then ``None`` at the end, or the
    exception); stops early when ``stop`` is set (the consumer gave up)."""
    try:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            while not stop.is_set():
                try:
                    out.put(batch, timeout=1.0)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        out.put(None)
    except BaseException as e:  # handed to the consumer
        out.put(e)


def run_images(cfg: JobConfig, in_fs, output: sh.JobOutput, plan: sh.ShardPlan, uri_prefix: str,
               timeline: list[tuple[float, int]], errors: dict[str, str] | None = None,
               model_sha256: str = "", heartbeat: Heartbeat | None = None,
               serve_info: dict | None = None) -> sh.WriteStats:
    """Run the pending shards of ``plan`` and write their part files as they complete.
    ``errors`` (unreadable inputs) get their error rows from the driver. ``timeline`` receives
    ``(seconds since start, images done)`` after every result batch, ``heartbeat`` a beat
    (it logs the stalls); after ``cfg.stall_timeout_s`` without one the job fails with
    :class:`JobStalledError`."""
    hb = heartbeat or Heartbeat(cfg.stall_warn_s, show(cfg.input))
    writer = output.writer(plan.pending, uri_prefix)
    pending = plan.pending_paths
    errors = errors or {}
    bad = {p: errors[p] for p in pending if p in errors}
    t0 = time.perf_counter()
    timeline.append((0.0, 0))
    done = 0
    hb.total = len(pending)
    hb.beat("running shards", 0)
    # In a terminal Ray Data draws its progress bars; elsewhere (logs, pipes) its progress is
    # INFO logging, hidden unless -v (raydetect/ray_logging.py): a line every 10 s instead.
    bar = None
    if cfg.progress and not sys.stdout.isatty():
        from raydetect.progress import Progress

        bar = Progress("detect", total=len(pending), unit="images", tty=False)
    if bad:
        writer.add(error_rows(bad, uri_prefix, model_sha256, cfg.detector.precision))
        done = len(bad)
        hb.beat(done=done)
    readable = [p for p in pending if p not in errors]
    if readable:
        ds = build_dataset(cfg, readable, in_fs, serve_info)
        results: queue.Queue = queue.Queue(maxsize=4)
        stop = threading.Event()
        producer = threading.Thread(target=_results, args=(ds, stop, results), name="raydetect-results", daemon=True)
        producer.start()
        try:
            while True:
                try:
                    item = results.get(timeout=1.0)
                except queue.Empty:
                    idle = hb.idle()
                    if cfg.stall_timeout_s is not None and idle >= cfg.stall_timeout_s:
                        raise JobStalledError(
                            f"no progress for {idle:.0f} s (stall_timeout_s {cfg.stall_timeout_s:g}) reading "
                            f"{show(cfg.input)}: {done} of {len(pending)} images done, "
                            f"{writer.stats.shards_written} of {len(plan.pending)} shards written; check "
                            "storage and workers, then re-run the same command to resume") from None
                    continue
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                writer.add(item)
                done += item.num_rows
                hb.beat(done=done)
                if bar is not None:
                    bar.update_to(done)
                timeline.append((time.perf_counter() - t0, done))
        finally:
            stop.set()
    if bar is not None:
        bar.close()
    writer.close()
    return writer.stats


@contextlib.contextmanager
def _storage_phase(what: str, cfg: JobConfig, resume: str = ""):
    """Turn "storage unreachable / timed out" during ``what`` into one
    :class:`StorageUnavailableError` line (other errors pass unchanged)."""
    try:
        yield
    except (StorageUnavailableError, JobStalledError):
        raise
    except Exception as e:
        reason = storage_failure(e)
        if reason is None:
            raise
        st = cfg.detector.storage
        raise StorageUnavailableError(
            f"storage unavailable while {what}: {reason} (deadline per request ~{st.request_deadline_s():.0f} s: "
            f"connect {st.connect_timeout_s:g} s, read {st.read_timeout_s:g} s, {st.max_attempts} attempts); "
            + (resume or "fix the storage and re-run the same command")
        ) from None


def run_job(cfg: JobConfig, *, overwrite: bool = False) -> JobSummary:
    """Run the batch job (connects to / starts Ray as ``ray.init()`` does). Resumes into an
    output written by the same job; see :mod:`raydetect.job.output`."""
    with Heartbeat(cfg.stall_warn_s, f"{show(cfg.input)} -> {show(cfg.output)}") as hb, _storage_phase(
        "running the job", cfg, f"re-run the same command to resume into {show(cfg.output)}"
    ):
        return _run_job(cfg, overwrite, hb)


def _run_job(cfg: JobConfig, overwrite: bool, hb: Heartbeat) -> JobSummary:
    import ray

    from raydetect.ray_logging import init_ray
    from raydetect.video.pipeline import run_video_job, split_videos

    t_start = time.perf_counter()
    hb.beat(f"listing {show(cfg.input)}")
    with _storage_phase(f"listing {show(cfg.input)}", cfg):
        listing = scan_inputs(cfg.input, cfg.extensions + cfg.video.extensions, cfg.detector.storage)
    in_fs, errors = listing.fs, listing.errors
    for p, reason in errors.items():
        log.warning("unreadable input %s: %s (written as an error row)", show(p), reason)
    paths = sorted(listing.files + list(errors))
    if cfg.limit is not None:
        paths = paths[: cfg.limit]
    files, videos = split_videos([p for p in paths if p not in errors], cfg.video)
    files = sorted(files + [p for p in paths if p in errors])
    if not files and not videos:
        raise FileNotFoundError(
            f"no images ({', '.join(cfg.extensions)}) or videos ({', '.join(cfg.video.extensions)}) "
            f"under {show(cfg.input)}" + (f" ({'; '.join(listing.skipped_lines())})" if listing.skipped else "")
        )
    prefix = uri_prefix(in_fs)
    serve_info = None
    if cfg.via_serve is not None:
        if videos:
            raise ValueError(f"--via-serve takes images only; {len(videos)} video(s) under {show(cfg.input)} "
                             f"(e.g. {show(videos[0])}): run them without --via-serve")
        hb.beat(f"connecting to the Serve application {cfg.via_serve}")
        if not ray.is_initialized():
            init_ray()  # quiet unless -v (raydetect/ray_logging.py)
        from raydetect.job.via_serve import connect

        _, serve_info = connect(cfg.via_serve)
    hb.beat(f"reading the model and preparing {show(cfg.output)}")
    with _storage_phase(f"reading the model and preparing {show(cfg.output)}", cfg):
        manifest = job_manifest(cfg, serve_info)
        output = open_output(cfg, manifest, overwrite)
        plan = output.plan(files, cfg.shard_size, prefix)
    total_shards = len(plan.pending) + len([d for d in plan.done if d not in plan.stale_parts])
    if plan.pending or videos:
        hb.beat("starting Ray and waiting for actor resources")
        if not ray.is_initialized():
            init_ray()  # quiet unless -v (raydetect/ray_logging.py)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = cfg.progress
        from raydetect.resources import wait_for_actor_resources

        wait_for_actor_resources(cfg.num_cpus, cfg.num_gpus, min(cfg.min_actors, cfg.concurrency),
                                 cfg.resource_wait_s)
    timeline: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    stats = sh.WriteStats()
    if plan.pending:
        log.info("%d of %d shards to run (%d images)", len(plan.pending), total_shards, len(plan.pending_paths))
        resume = (f"the finished shards are in {show(cfg.output)}; re-run the same command to resume "
                  "(done shards are skipped)")
        with _storage_phase(f"running {len(plan.pending)} shards of {show(cfg.input)}", cfg, resume):
            stats = run_images(cfg, in_fs, output, plan, prefix, timeline, errors,
                               manifest["model_sha256"], hb, serve_info)
    hb.beat("summarizing")
    seconds = time.perf_counter() - t0
    detections, n_errors = output.totals()
    summary = JobSummary(images=len(files), seconds=seconds, detections=detections, errors=n_errors,
                         output=cfg.output)
    summary.processed = len(plan.pending_paths)
    summary.shards = total_shards
    summary.shards_skipped = total_shards - len(plan.pending)
    summary.duplicates_dropped = stats.duplicates_dropped
    summary.write_s = stats.write_s
    summary.unreadable = sum(1 for p in files if p in errors)
    summary.skipped = dict(listing.skipped)
    summary.startup_s = t0 - t_start
    if videos:  # after the images: totals() read the top level of the output only then
        hb.mute("running videos")
        summary.video = run_video_job(cfg, in_fs, videos)
    if cfg.report and files:
        summary.report = _write_report(cfg, summary, timeline, in_fs, output.fs, output.path, prefix,
                                       keep_existing=not plan.pending)
    return summary


def _write_report(cfg, summary, timeline, in_fs, out_fs, out_path, uri_prefix, keep_existing) -> str | None:
    """The job report (never fails the job: results are already written). A re-run that found
    every shard done keeps the report of the run that did the work."""
    from raydetect.job.report import existing_report, write_report

    try:
        if keep_existing and (url := existing_report(cfg, out_fs, out_path)):
            return url
        return write_report(cfg, summary, timeline, in_fs, out_fs, out_path, uri_prefix)
    except Exception:
        log.exception("could not write the job report (the results are complete)")
        return None
