"""``raydetect nncf-quantize``: NNCF post-training INT8 quantization of a YOLO ONNX export; every
flag is a field of :class:`~raydetect.ov_quantize.NNCFQuantizeConfig`."""

from __future__ import annotations

import argparse
import json

from raydetect.cli.common import add_fields, config_from_args
from raydetect.ov_quantize import NNCFQuantizeConfig


def add_cli(sub) -> None:
    p = sub.add_parser(
        "nncf-quantize",
        help="INT8 post-training quantization with NNCF (QDQ ONNX for --engine openvino)",
        description="NNCF post-training quantization of a YOLO ONNX export into a QDQ ONNX model that the openvino "
        "engine runs with INT8 kernels (ONNX Runtime runs it too). Calibrate on training or validation images, "
        "never the test split. Needs pip install 'raydetect[compress]' (nncf).",
    )
    add_fields(p, NNCFQuantizeConfig, title="nncf-quantize")
    p.add_argument("--report", dest="_report", default=None, help="write the JSON report here")
    p.set_defaults(func=_cmd_nncf_quantize)


def nncf_quantize_config(args: argparse.Namespace) -> NNCFQuantizeConfig:
    return config_from_args(NNCFQuantizeConfig, args, "nncf-quantize")


def _cmd_nncf_quantize(args: argparse.Namespace) -> int:
    from raydetect.ov_quantize import nncf_quantize

    cfg = nncf_quantize_config(args)
    report = nncf_quantize(cfg)  # NNCFQuantizeError (a RaydetectError): exit 2 with its message
    if args._report:
        with open(args._report, "w") as f:
            json.dump(report, f, indent=1)
    print(f"INT8 model: {report['out']} ({report['int8_bytes'] / 1e6:.2f} MB, FP32 {report['fp32_bytes'] / 1e6:.2f} MB; "
          f"{report['calibration_images']} calibration images, {len(report['float_tail'])} nodes kept in float)")
    return 0
