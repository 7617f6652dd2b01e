"""The ``raydetect`` command line. Each subcommand lives in its own module, which provides
``add_cli(subparsers)``; the shared detector/storage options are defined here once."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Any

from raydetect.config import ConfigError, DetectorConfig, StorageConfig, validate

#: subcommand → module providing ``add_cli(subparsers)``; imported lazily at start-up
#: (heavy imports such as ray stay inside the command functions).
SUBCOMMANDS: list[tuple[str, str]] = [
    ("detect", "raydetect.job"),
    ("build", "raydetect.engines.tensorrt_build"),
    ("serve", "raydetect.serve_cli"),
    ("eval", "raydetect.evaluate"),
    ("quantize", "raydetect.quantize"),
    ("bench", "raydetect.bench"),
    ("plan", "raydetect.plan"),
]


def add_storage_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("object storage (s3:// URLs, through s3fs)")
    g.add_argument("--endpoint-url", default=os.environ.get("RAYDETECT_S3_ENDPOINT_URL"),
                   help="S3-compatible endpoint (env RAYDETECT_S3_ENDPOINT_URL); default AWS")
    g.add_argument("--anon", action="store_true", help="anonymous access (public buckets)")
    g.add_argument("--region", default=None, help="S3 region (default: from the environment)")
    g.add_argument("--key-env", default=None, metavar="VAR",
                   help="read the access key id from this environment variable "
                        "(default: the usual AWS credential chain)")
    g.add_argument("--secret-env", default=None, metavar="VAR",
                   help="read the secret access key from this environment variable")
    fields = StorageConfig.model_fields
    for flag, name in (("--s3-connect-timeout", "connect_timeout_s"), ("--s3-read-timeout", "read_timeout_s"),
                       ("--s3-max-attempts", "max_attempts")):
        f = fields[name]
        g.add_argument(flag, dest=name, type=type(f.default), default=f.default,
                       help=f"{f.description} (default {f.default})")


def add_detector_args(p: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", required=model_required, help="YOLO ONNX export (path or s3:// URL)")
    g.add_argument("--engine", default="auto", help="auto | onnxruntime | torch | tensorrt")
    g.add_argument("--precision", default="fp32", help="fp32 | fp16 | int8")
    g.add_argument("--conf", type=float, default=0.25, help="confidence threshold (default 0.25)")
    g.add_argument("--iou", type=float, default=0.7, help="NMS IoU threshold (default 0.7)")
    g.add_argument("--max-det", type=int, default=300, help="max detections per image")
    g.add_argument("--batch-size", type=int, default=16, help="images per engine call")
    g.add_argument("--max-pixels", type=int, default=40_000_000,
                   help="images with more pixels become error rows")
    g.add_argument("--threads", type=int, default=None, help="CPU engine threads")
    g.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: pick)")
    g.add_argument("--trt-cache", default=None, metavar="URL",
                   help="TensorRT engine cache: local dir or s3:// prefix (default: next to the model)")


def storage_config(args: argparse.Namespace) -> StorageConfig:
    def env(var: str | None) -> str | None:
        if var is None:
            return None
        if var not in os.environ:
            raise ConfigError(f"storage: environment variable {var} is not set")
        return os.environ[var]

    return validate(
        StorageConfig,
        {
            "endpoint_url": args.endpoint_url,
            "anon": args.anon,
            "region": args.region,
            "key": env(args.key_env),
            "secret": env(args.secret_env),
            "connect_timeout_s": getattr(args, "connect_timeout_s", StorageConfig.model_fields["connect_timeout_s"].default),
            "read_timeout_s": getattr(args, "read_timeout_s", StorageConfig.model_fields["read_timeout_s"].default),
            "max_attempts": getattr(args, "max_attempts", StorageConfig.model_fields["max_attempts"].default),
        },
        "storage",
    )


def detector_config(args: argparse.Namespace, **overrides: Any) -> DetectorConfig:
    data = {
        "model": args.model,
        "engine": args.engine,
        "precision": args.precision,
        "conf": args.conf,
        "iou": args.iou,
        "max_det": args.max_det,
        "batch_size": args.batch_size,
        "max_pixels": args.max_pixels,
        "threads": args.threads,
        "device": args.device,
        "storage": storage_config(args),
        "tensorrt": {"cache": getattr(args, "trt_cache", None)},
        **overrides,
    }
    return validate(DetectorConfig, data, "detector")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydetect", description="YOLO object detection over images and video with Ray"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for _, module in SUBCOMMANDS:
        importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"raydetect {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from raydetect.engines.base import EngineUnavailableError
        from raydetect.model_card import UnsupportedModelError
        from raydetect.resources import InsufficientResourcesError
        from raydetect.storage import StorageUnavailableError, storage_failure

        if isinstance(e, (EngineUnavailableError, UnsupportedModelError, InsufficientResourcesError)):
            print(f"raydetect {args.command}: error: {e}", file=sys.stderr)
            return 2
        if isinstance(e, (StorageUnavailableError, TimeoutError)):  # incl. job.JobStalledError
            print(f"raydetect {args.command}: error: {e}", file=sys.stderr)
            return 3
        reason = storage_failure(e)
        if reason is not None:
            print(f"raydetect {args.command}: error: storage unavailable: {reason}; fix the storage and "
                  "re-run the same command", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
