"""The video options of ``raydetect detect`` (added to the job's parser by :mod:`raydetect.job`)."""

from __future__ import annotations

import argparse
from typing import Any


def add_video_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("video inputs (mp4, mkv, avi, mov, m4v, webm)")
    g.add_argument("--segment-s", type=float, default=60.0,
                   help="seconds of video per Ray Data row; segments run in parallel (default 60)")
    s = g.add_mutually_exclusive_group()
    s.add_argument("--fps", type=float, default=None, help="sample at most F frames per second (by PTS)")
    s.add_argument("--every", type=int, default=None, help="keep every N-th frame (index from PTS)")
    g.add_argument("--gate", action="store_true",
                   help="skip frames that barely differ from the last processed one (motion gating)")
    g.add_argument("--gate-threshold", type=float, default=1.0,
                   help="mean absolute grey difference (0-255) on a 64 px thumbnail below which a frame "
                        "is skipped (default 1.0)")
    g.add_argument("--gate-refresh", type=int, default=25,
                   help="process at least every K-th sampled frame when gating (default 25)")
    g.add_argument("--video-decoder", default="auto", choices=["auto", "cpu", "nvdec"],
                   help="auto: NVDEC (torchcodec) when usable in a GPU actor, else PyAV on the CPU")


def video_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``video`` section of the job config from parsed arguments."""
    return {
        "segment_s": args.segment_s,
        "fps": args.fps,
        "every": args.every,
        "gate": args.gate,
        "gate_threshold": args.gate_threshold,
        "gate_refresh": args.gate_refresh,
        "decoder": args.video_decoder,
    }
