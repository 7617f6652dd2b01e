"""The video options of ``raydetect detect`` (added to the job's parser by :mod:`raydetect.job`),
generated from :class:`raydetect.config.VideoConfig` (one name, default and check per setting)."""

from __future__ import annotations

import argparse
from typing import Any

from raydetect.config import VideoConfig

#: VideoConfig field → (flag, argparse overrides)
VIDEO_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "segment_s": ("--segment-s", {}),
    "gate": ("--gate", {}),
    "gate_threshold": ("--gate-threshold", {}),
    "gate_refresh": ("--gate-refresh", {}),
    "decoder": ("--video-decoder", {}),
    "sessions": ("--video-sessions", {}),
}


def add_video_args(p: argparse.ArgumentParser) -> None:
    from raydetect.cli import field_argument

    g = p.add_argument_group("video inputs (mp4, mkv, avi, mov, m4v, webm)")
    s = g.add_mutually_exclusive_group()
    field_argument(s, VideoConfig, "fps", "--fps", dest="fps")
    field_argument(s, VideoConfig, "every", "--every", dest="every")
    for name, (flag, extra) in VIDEO_FLAGS.items():
        field_argument(g, VideoConfig, name, flag, dest=f"video_{name}", **extra)


def video_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``video`` section of the job config from parsed arguments."""
    return {"fps": args.fps, "every": args.every, **{n: getattr(args, f"video_{n}") for n in VIDEO_FLAGS}}
