"""``raydetect compress``: prune, fine-tune, quantization-aware train and export a YOLO checkpoint,
gated on mAP; every flag is a field of :class:`~raydetect.compress.CompressConfig`."""

from __future__ import annotations

import argparse
import os

from raydetect.cli.common import add_fields, config_from_args
from raydetect.compress import REPORT_NAME, CompressConfig


def add_cli(sub) -> None:
    p = sub.add_parser(
        "compress",
        help="prune, fine-tune, quantization-aware train and export a YOLO checkpoint, gated on mAP",
        description="From an Ultralytics .pt checkpoint and a YOLO data.yaml: structured pruning (torch-pruning), "
        "fine-tuning (Ultralytics' trainer, AGPL-3.0), NNCF quantization-aware training, export to an INT8 QDQ "
        "ONNX model and an OpenVINO IR. Every step's model, mAP on the evaluation split and CPU speed go to "
        f"<out>/{REPORT_NAME}; a step losing more than --max-map-drop points fails the command with no model "
        "written. Needs pip install 'raydetect[compress]'.",
    )
    add_fields(p, CompressConfig, title="compress",
               extra={"ignore": {"nargs": "+", "type": str, "metavar": "LAYER"}})
    p.set_defaults(func=_cmd_compress)


def compress_config(args: argparse.Namespace) -> CompressConfig:
    return config_from_args(CompressConfig, args, "compress")


def _cmd_compress(args: argparse.Namespace) -> int:
    import sys

    from raydetect.compress import compress

    cfg = compress_config(args)
    report = compress(cfg)  # CompressError (a RaydetectError): exit 2 with its message
    print(f"report: {os.path.join(cfg.out, REPORT_NAME)}")
    if not report.passed:
        print(f"raydetect compress: {report.message}", file=sys.stderr)
        return 1
    for s in report.steps:
        if s.model:
            print(f"{s.step}: {s.model}")
    return 0
