"""``raydetect bench``: engine and end-to-end images/s, latency and peak memory per batch size;
every flag is a field of :class:`~raydetect.config.BenchConfig` (``detector.*``: its detector's)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from raydetect.cli.common import add_detector_args, add_fields, config_from_args
from raydetect.config import BenchConfig


def bench_config(args: argparse.Namespace) -> BenchConfig:
    return config_from_args(BenchConfig, args, "bench")


def _cmd_bench(args: argparse.Namespace) -> int:
    from raydetect.bench import run_bench
    from raydetect.progress import Progress

    cfg = bench_config(args)
    # a live bar in a terminal (result lines printed above it), a line every 10 s in logs
    with Progress("bench", total=2 * len(cfg.batch_sizes), unit="timings") as bar:
        result = run_bench(cfg, progress=bar.write, steps=bar)
    text = json.dumps(result, indent=2)
    if args._out:
        Path(args._out).parent.mkdir(parents=True, exist_ok=True)
        Path(args._out).write_text(text + "\n")
        print(f"raydetect bench: wrote {args._out}")
    else:
        print(text)
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("bench", help="engine and end-to-end images/s, latency and peak memory per batch size")
    add_fields(p, BenchConfig)
    p.add_argument("--out", dest="_out", default=None, help="write the JSON here (default: print it)")
    add_detector_args(p)
    p.set_defaults(func=_cmd_bench)
