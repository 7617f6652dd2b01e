"""``raydetect eval``: mAP@0.5 and mAP@0.5:0.95 of a model on a labelled set; every flag is a
field of :class:`~raydetect.config.EvalConfig` (``detector.*``: its detector's, with Ultralytics'
val settings as this command's defaults)."""

from __future__ import annotations

import argparse

from raydetect.cli.common import add_detector_args, add_fields, config_from_args
from raydetect.config import EvalConfig
from raydetect.evaluate import CONVENTIONS, VAL_CONF, VAL_IOU, VAL_MAX_DET


def add_cli(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="mAP@0.5 and mAP@0.5:0.95 of a model on a labelled set (YOLO txt or COCO json)",
        description="Evaluate a YOLO ONNX model on a labelled set with pycocotools. " + CONVENTIONS,
    )
    add_fields(p, EvalConfig, extra={"eval_cache": {"metavar": "DIR"},
                                     "write_cache": {"action": "store_false", "help": "do not write the evaluation cache"}},
               flags={"write_cache": "--no-eval-cache"})
    p.add_argument("--report", dest="_report", default=None, help="write the JSON report here (per-class AP included)")
    # Ultralytics' val settings, as defaults that --help shows
    add_detector_args(p, defaults={"conf": VAL_CONF, "iou": VAL_IOU, "max_det": VAL_MAX_DET})
    p.set_defaults(func=_cmd_eval)


def eval_config(args: argparse.Namespace) -> EvalConfig:
    return config_from_args(EvalConfig, args, "eval")


def _cmd_eval(args: argparse.Namespace) -> int:
    from raydetect.evaluate import run_eval, write_report
    from raydetect.progress import Progress

    cfg = eval_config(args)
    # a live bar in a terminal, a line every 10 s in logs
    with Progress("eval", unit="images") as progress:
        report = run_eval(cfg, progress=progress)
    print(report.table())
    print(report.line())
    if args._report:
        write_report(report, args._report, cfg.detector.storage)
        print(f"report: {args._report}")
    return 0
