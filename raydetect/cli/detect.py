"""``raydetect detect``: the batch job (:func:`raydetect.job.run.run_job`) from the command line;
every flag is a field of :class:`~raydetect.config.JobConfig` (``video.*``: its
:class:`~raydetect.config.VideoConfig`, ``detector.*``: the detector's)."""

from __future__ import annotations

import argparse
import time

from raydetect.cli.common import add_detector_args, add_fields, config_from_args
from raydetect.config import JobConfig, VideoConfig

JOB_HELP = {
    "input": {"help": "image/video file, directory or s3:// prefix"},
    "output": {"help": "Parquet output directory or s3:// prefix"},
    "extensions": {"help": "image file extensions read from the input"},
    "progress": {"help": "show a progress bar (a line every 10 s when not a terminal)"},
    "via_serve": {"metavar": "APP"},
}
VIDEO_FLAGS = {"decoder": "--video-decoder", "sessions": "--video-sessions", "extensions": "--video-extensions"}


def add_job_args(p: argparse.ArgumentParser) -> None:
    add_fields(p, JobConfig, extra=JOB_HELP)
    p.add_argument("--overwrite", dest="_overwrite", action="store_true",
                   help="replace an existing output (default: resume it if it was written by the same job)")
    add_detector_args(p)
    add_fields(p, VideoConfig, path="video", flags=VIDEO_FLAGS, title="video inputs (mp4, mkv, avi, mov, m4v, webm)")


def job_config(args: argparse.Namespace) -> JobConfig:
    return config_from_args(JobConfig, args, "job")


def _process_age_s() -> float:
    """Seconds since this process started (Python and raydetect imports, option parsing), 0.0
    where that cannot be read."""
    try:
        import psutil  # a dependency of ray

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:
        return 0.0


def _cmd_detect(args: argparse.Namespace) -> int:
    from raydetect.job.run import run_job

    before = _process_age_s()
    cfg = job_config(args)
    summary = run_job(cfg, overwrite=args._overwrite)
    summary.startup_s += before  # the summary's time is the time the command took to get going too
    summary.total_s = _process_age_s()
    print(summary.line(), flush=True)
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("detect", help="run detection over images and video into Parquet (Ray Data)")
    add_job_args(p)
    p.set_defaults(func=_cmd_detect)
