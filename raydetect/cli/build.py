"""``raydetect build``: build (or find in the cache) the TensorRT engine of a model for this GPU.
Its options are the detector's and the TensorRT group that ``detect``/``serve`` take, from the same
config fields, so the same values there find this engine in the cache."""

from __future__ import annotations

import argparse
import sys
import time

from raydetect.cli.common import DeprecatedAlias, add_detector_args, config_values
from raydetect.config import DetectorConfig, validate
from raydetect.engines.base import EngineUnavailableError

#: the detector options ``build`` takes (the rest do not change the engine)
BUILD_FIELDS = ("model", "precision", "conf", "iou", "max_det", "batch_size", "device")


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "build",
        help="build (or find in the cache) the TensorRT engine of a model for this GPU",
        description=(
            "Build the TensorRT engine of a YOLO ONNX model for the GPU of this machine, with NMS inside "
            "the network, and store it in the engine cache (next to the model, or --trt-cache). Prints the "
            "build time and the layer precision summary. The options are those of detect/serve: the same "
            "values there find this engine in the cache."
        ),
    )
    add_detector_args(p, fields=BUILD_FIELDS)
    # the spellings raydetect build had before sharing detect's options
    p.add_argument("--max-batch", dest="detector.batch_size", type=int, action=DeprecatedAlias, new="--batch-size")
    p.add_argument("--cache", dest="detector.tensorrt.cache", action=DeprecatedAlias, new="--trt-cache")
    p.add_argument("--force", dest="_force", action="store_true", help="rebuild even when the cache has the engine")
    p.set_defaults(func=run_build)


def build_config(args: argparse.Namespace) -> DetectorConfig:
    return validate(DetectorConfig, {**config_values(args)["detector"], "engine": "tensorrt"}, "detector")


def run_build(args: argparse.Namespace) -> int:
    from raydetect.model_card import ModelCard
    from raydetect.tensorrt.build import prepare_engine
    from raydetect.tensorrt.rules import format_precision_summary, probe_availability

    why = probe_availability()
    if why is not None:
        raise EngineUnavailableError(f"cannot build a TensorRT engine here: {why}")
    config = build_config(args)
    card = ModelCard.load(config.model, config.storage)
    t0 = time.perf_counter()
    prepared = prepare_engine(card, config, force=args._force)
    total = time.perf_counter() - t0
    r = prepared.result
    k = prepared.key
    out = sys.stdout
    print(f"engine: {r.engine_url}", file=out)
    if r.status == "hit":
        print(f"cache hit: already built for this GPU and settings (loaded in {total:.1f} s)", file=out)
    else:
        extra = f" ({r.reason})" if r.status == "rebuilt" else ""
        print(f"{r.status}{extra}: build time {r.build_seconds:.1f} s", file=out)
    print(
        f"model {card.url}: precision {prepared.plan.precision}, NMS {prepared.nms} {prepared.nms_params}, "
        f"batch profile min/opt/max {k.batch_profile}, input {k.imgsz[0]}x{k.imgsz[1]}",
        file=out,
    )
    print(f"GPU {k.gpu_name} (sm{k.compute_capability}), TensorRT {k.tensorrt_version}", file=out)
    print(format_precision_summary(prepared.precision_summary()), file=out)
    return 0
