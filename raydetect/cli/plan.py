"""``raydetect plan``: GPUs for N streams at F fps from measured throughput; the settings are
:class:`~raydetect.config.PlanConfig`'s fields."""

from __future__ import annotations

import argparse
import json

from raydetect.cli.common import add_fields, config_from_args
from raydetect.config import ConfigError, PlanConfig
from raydetect.plan import STAGES, PlanError, make_plan


def plan_config(args: argparse.Namespace) -> PlanConfig:
    return config_from_args(PlanConfig, args, "plan")


def _cmd_plan(args: argparse.Namespace) -> int:
    cfg = plan_config(args)
    bench = None
    if args._bench:
        with open(args._bench) as f:
            try:
                bench = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"plan.bench: {args._bench} is not JSON ({e})") from None
    try:
        plan = make_plan(cfg, bench, args._stage)
    except PlanError as e:
        raise ConfigError(f"plan: {e}") from None
    if args._json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print("\n".join(plan.lines()))
        if bench is not None and not str(bench.get("device", "")).startswith("cuda"):
            print(f"note: the bench ran on {bench.get('device')!r}, not a GPU: the count is of such devices")
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("plan", help="GPUs needed for N streams at F fps, from measured throughput")
    add_fields(p, PlanConfig, skip=("per_gpu_fps",))
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bench", dest="_bench", help="JSON written by 'raydetect bench' on the target GPU")
    add_fields(src, PlanConfig, only=("per_gpu_fps",))
    p.add_argument("--stage", dest="_stage", choices=STAGES, default="end_to_end",
                   help="which measured throughput to use (default end_to_end: decode+infer+NMS)")
    p.add_argument("--json", dest="_json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_cmd_plan)
