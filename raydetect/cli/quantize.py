"""``raydetect quantize``: INT8 post-training quantization with calibration and an mAP gate;
every flag is a field of :class:`~raydetect.quantize.QuantizeConfig`."""

from __future__ import annotations

import argparse
import sys

from raydetect.cli.common import DeprecatedAlias, add_fields, add_storage_args, config_from_args
from raydetect.quantize import QuantizeConfig

QUANTIZE_HELP = {
    "out": {"help": "INT8 model to write (e.g. model_int8.onnx)"},
    "exclude": {"nargs": "+", "type": str, "metavar": "NODE"},
    "eval_cache": {"metavar": "DIR", "help": "cached evaluations (default $RAYDETECT_EVAL_CACHE or "
                   "~/.cache/raydetect/eval): an FP32 evaluation of the same model sha256, images and settings "
                   "there (from raydetect eval or an earlier quantize) is reused instead of evaluating FP32 again"},
}


def add_cli(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="INT8 post-training quantization (QDQ ONNX) with calibration and an mAP gate",
        description="Calibrate on representative images (production letterbox), write an INT8 QDQ "
        "ONNX model and its calibration table; with --eval-data, fail when mAP@0.5 drops too much.",
    )
    add_fields(p, QuantizeConfig, extra=QUANTIZE_HELP)
    p.add_argument("--per-tensor-weights", dest="per_channel", action=DeprecatedAlias, const=False,
                   new="--no-per-channel")
    p.add_argument("--report", dest="_report", default=None, help="write the JSON report here")
    add_storage_args(p)
    p.set_defaults(func=_cli)


def quantize_config(args: argparse.Namespace) -> QuantizeConfig:
    return config_from_args(QuantizeConfig, args, "quantize")


def _cli(args) -> int:
    from raydetect.quantize import quantize

    cfg = quantize_config(args)
    report = quantize(cfg, progress=True)  # CalibrationError, DatasetError: exit 2 with their message
    print(f"kept in float ({len(report.exclusions)} nodes, rule: "
          f"{'float-tail' if report.exclusion_rule else 'none'}): {', '.join(report.exclusions)}")
    print(f"calibration: {report.calibration['used']} images from {cfg.calib} (seed {cfg.seed}), "
          f"{len(report.calibration['unreadable'])} unreadable skipped")
    if report.fp32_reused:
        print(f"FP32 evaluation: reused {report.fp32_reused} (same model, images and settings)")
    for a in report.attempts:
        if a.passed is None:
            print(f"method {a.method}: quantized (no --eval-data, no gate)")
        else:
            print(f"method {a.method}: INT8 mAP@0.5 {a.int8_map50:.4f} (FP32 {report.fp32['map50']:.4f}), "
                  f"drop {a.drop_points:.2f} points -> {'pass' if a.passed else 'FAIL'}")
    if args._report:
        from raydetect.evaluate import write_report

        write_report(report.as_dict(), args._report, cfg.storage)
        print(f"report: {args._report}")
    if report.passed is False:
        print(f"raydetect quantize: mAP@0.5 dropped {report.drop_points:.2f} points > --max-map-drop "
              f"{cfg.max_map_drop}; no model written", file=sys.stderr)
        return 1
    print(f"INT8 model: {report.out} ({report.int8_bytes / 1e6:.2f} MB, FP32 {report.fp32_bytes / 1e6:.2f} MB, "
          f"method {report.method}); calibration table: {report.table}")
    return 0
