"""The batch job: images from local paths or S3 → Ray Data → detector actor pool → Parquet.

Ray Data reads only the compressed bytes; decoding happens inside the detector actors,
so decoded pixels never travel between processes.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads

from raydetect.config import JobConfig, validate
from raydetect.storage import filesystem, is_remote_fs, list_files

log = logging.getLogger(__name__)


@dataclass
class JobSummary:
    images: int
    seconds: float
    detections: int
    errors: int
    output: str
    video: Any = None  # raydetect.video.pipeline.VideoJobSummary when the input held videos

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        text = (
            f"raydetect: {self.images} images in {self.seconds:.1f} s "
            f"({self.images_per_s:.1f} images/s), {self.detections} detections, "
            f"{self.errors} errors -> {self.output}"
        )
        return text if self.video is None else f"{text}\n{self.video.line()}"

    def as_dict(self) -> dict:
        return {**asdict(self), "images_per_s": self.images_per_s}


def build_dataset(cfg: JobConfig, files: list[str], fs):
    """The lazy Ray Dataset of result rows for ``files`` on ``fs``."""
    import ray

    ds = ray.data.read_binary_files(files, filesystem=fs, include_paths=True)
    from raydetect.detector import Detector

    max_size = cfg.concurrency
    min_size = min(cfg.min_actors, max_size)
    threads = {}
    if cfg.actor_concurrency > 1:  # calls run in threads: one decodes while another infers
        threads = {"max_concurrent_calls_per_actor": cfg.actor_concurrency, "enable_true_multi_threading": True}
    return ds.map_batches(
        Detector,
        fn_constructor_kwargs={
            "config": cfg.detector,
            "uri_prefix": "s3://" if is_remote_fs(fs) else "",
        },
        batch_size=cfg.rows_per_call or cfg.detector.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=min_size, max_size=max_size, **threads),
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
    )


def _prepare_output(cfg: JobConfig, overwrite: bool):
    out_fs, out_path = filesystem(cfg.output, cfg.detector.storage)
    if out_fs.exists(out_path):
        existing = [p for p in out_fs.find(out_path) if p.endswith(".parquet")]
        if existing and not overwrite:
            raise FileExistsError(
                f"output {cfg.output} already holds {len(existing)} Parquet files; "
                "choose an empty output or pass --overwrite"
            )
        if existing:
            out_fs.rm(out_path, recursive=True)
    return out_fs, out_path


def summarize(out_fs, out_path: str, images: int, seconds: float, output: str) -> JobSummary:
    table = pads.dataset(out_path, filesystem=out_fs, format="parquet").to_table(
        columns=["detections", "error"]
    )
    dets = int(pc.sum(pc.list_value_length(table["detections"])).as_py() or 0)
    errors = int(table["error"].is_valid().to_numpy(zero_copy_only=False).sum())
    return JobSummary(images=images, seconds=seconds, detections=dets, errors=errors, output=output)


def run_job(cfg: JobConfig, *, overwrite: bool = False) -> JobSummary:
    """Run the batch job (connects to / starts Ray as ``ray.init()`` does)."""
    import ray

    from raydetect.video.pipeline import run_video_job, split_videos

    in_fs, files = list_files(cfg.input, cfg.extensions + cfg.video.extensions, cfg.detector.storage)
    if cfg.limit is not None:
        files = files[: cfg.limit]
    files, videos = split_videos(files, cfg.video)
    if not files and not videos:
        raise FileNotFoundError(
            f"no images ({', '.join(cfg.extensions)}) or videos ({', '.join(cfg.video.extensions)}) "
            f"under {cfg.input}"
        )
    out_fs, out_path = _prepare_output(cfg, overwrite)
    if not ray.is_initialized():
        ray.init(logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.progress
    summary = JobSummary(images=0, seconds=0.0, detections=0, errors=0, output=cfg.output)
    if files:
        t0 = time.perf_counter()
        ds = build_dataset(cfg, files, in_fs)
        ds.write_parquet(out_path, filesystem=out_fs)
        seconds = time.perf_counter() - t0
        summary = summarize(out_fs, out_path, len(files), seconds, cfg.output)
    if videos:  # after the images: summarize() reads the top level of the output only then
        summary.video = run_video_job(cfg, in_fs, videos)
    return summary


# --- CLI ------------------------------------------------------------------------------------


def add_job_args(p: argparse.ArgumentParser) -> None:
    from raydetect.cli import add_detector_args, add_storage_args

    p.add_argument("--input", required=True, help="image file, directory or s3:// prefix")
    p.add_argument("--output", required=True, help="Parquet output directory or s3:// prefix")
    p.add_argument("--concurrency", type=int, default=1, help="max detector actors (default 1)")
    p.add_argument("--min-actors", type=int, default=1, help="actors kept when idle (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (fractions ok)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per actor")
    p.add_argument("--limit", type=int, default=None, help="process at most N files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_detector_args(p)
    add_storage_args(p)
    from raydetect.video.cli_args import add_video_args

    add_video_args(p)


def job_config(args: argparse.Namespace) -> JobConfig:
    from raydetect.cli import detector_config
    from raydetect.video.cli_args import video_options

    return validate(
        JobConfig,
        {
            "input": args.input,
            "output": args.output,
            "detector": detector_config(args),
            "concurrency": args.concurrency,
            "min_actors": args.min_actors,
            "num_gpus": args.num_gpus,
            "num_cpus": args.num_cpus,
            "limit": args.limit,
            "progress": not args.no_progress,
            "video": video_options(args),
        },
        "job",
    )


def _cmd_detect(args: argparse.Namespace) -> int:
    cfg = job_config(args)
    summary = run_job(cfg, overwrite=args.overwrite)
    print(summary.line(), flush=True)
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("detect", help="run detection over images into Parquet (Ray Data)")
    add_job_args(p)
    p.set_defaults(func=_cmd_detect)
