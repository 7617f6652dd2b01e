"""The ``raydetect`` command line. Each subcommand lives in its own module, which provides
``add_cli(subparsers)``; the shared detector/storage options are defined here once."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import types
import typing
from typing import Any

from raydetect.config import ConfigError, DetectorConfig, StorageConfig, TensorRTConfig, TorchConfig, validate
from raydetect.errors import RaydetectError

#: subcommand → module providing ``add_cli(subparsers)``; imported lazily at start-up
#: (heavy imports such as ray stay inside the command functions).
SUBCOMMANDS: list[tuple[str, str]] = [
    ("detect", "raydetect.job"),
    ("build", "raydetect.engines.tensorrt_build"),
    ("serve", "raydetect.serve_cli"),
    ("eval", "raydetect.evaluate"),
    ("quantize", "raydetect.quantize"),
    ("compress", "raydetect.compress"),
    ("nncf-quantize", "raydetect.ov_quantize"),
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


#: DetectorConfig fields of the "model and engine" option group → argparse overrides (the flag
#: is ``--kebab-name``; default and help come from the field).
DETECTOR_FLAGS: dict[str, dict[str, Any]] = {
    "model": {"help": "YOLO ONNX export (path or s3:// URL)"},
    "engine": {"help": "runtime; auto: the first that can run here (tensorrt > torch > onnxruntime; openvino only when named)"},
    "precision": {"help": "engine precision (int8: a QDQ model from raydetect quantize)"},
    "conf": {},
    "iou": {},
    "max_det": {"help": "max detections per image"},
    "batch_size": {"help": "images per engine call; for TensorRT also the largest batch of the engine profile"},
    "max_pixels": {},
    "threads": {},
    "device": {},
    "image_decoder": {},
}

#: TensorRTConfig fields shared by ``build`` and every command that runs an engine (detect,
#: serve, eval, bench): one name and one default, so ``build`` then ``detect`` with the same
#: options find the same engine. field → flag.
TENSORRT_FLAGS: dict[str, str] = {
    "cache": "--trt-cache",
    "opt_batch": "--opt-batch",
    "nms": "--nms",
    "workspace_gb": "--workspace-gb",
}


def _batch_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes, e.g. 1,8,64 (got {text!r})") from None


#: TorchConfig fields (the compiled torch engine) → flag and argparse overrides.
TORCH_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "compile": ("--compile", {}),
    "compile_batches": ("--compile-batches", {"type": _batch_list, "metavar": "B,B,..."}),
    "cache": ("--torch-cache", {}),
}


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: accepted, with a note on stderr naming the new one."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"raydetect: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def field_argument(group, model, name: str, flag: str | None = None, dest: str | None = None, **overrides) -> None:
    """``group.add_argument`` for the pydantic field ``model.name``: ``--kebab-name``, the
    field's default, its description as help; the value is validated by the config model."""
    f = model.model_fields[name]
    ann = f.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):  # X | None → X
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        ann = inner[0] if len(inner) == 1 else None
    kind = ann
    kwargs: dict[str, Any] = {"dest": dest or name}
    # a command may override the field's default (eval: conf 0.001); the help shows the real one
    default = overrides.pop("default", f.default)
    if f.is_required():
        kwargs["required"] = True
    else:
        kwargs["default"] = default
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is typing.Literal:
        kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    else:
        kwargs["metavar"] = name.upper()
        if kind in (int, float):
            kwargs["type"] = kind
    text = overrides.pop("help", None) or f.description or name.replace("_", " ")
    if not f.is_required():
        text += f" (default {'none' if default is None else default})"
    kwargs["help"] = text
    kwargs.update(overrides)
    group.add_argument(flag or "--" + name.replace("_", "-"), **kwargs)


def add_detector_args(
    p: argparse.ArgumentParser, *, model_required: bool = True, fields: tuple[str, ...] | None = None,
    defaults: dict[str, Any] | None = None,
) -> None:
    """The detector options (``fields``: a subset of :data:`DETECTOR_FLAGS`, default all) and
    the TensorRT options, generated from :class:`DetectorConfig` / :class:`TensorRTConfig`.
    ``defaults`` overrides field defaults for this command (shown in ``--help`` as well)."""
    g = p.add_argument_group("model and engine")
    for name in fields or DETECTOR_FLAGS:
        extra = dict(DETECTOR_FLAGS[name])
        if defaults and name in defaults:
            extra["default"] = defaults[name]
        if name == "model" and not model_required:
            extra["required"] = False
            extra["default"] = None
        field_argument(g, DetectorConfig, name, **extra)
    add_tensorrt_args(p)
    add_torch_args(p)


def add_torch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("torch engine (compiled: inductor + CUDA graphs)")
    for name, (flag, extra) in TORCH_FLAGS.items():
        field_argument(g, TorchConfig, name, flag, dest=f"torch_{name}", **extra)


def torch_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TorchConfig values given on the command line."""
    return {name: getattr(args, f"torch_{name}") for name in TORCH_FLAGS if hasattr(args, f"torch_{name}")}


def add_tensorrt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TensorRT engine (same options for build, detect, serve, eval, bench)")
    for name, flag in TENSORRT_FLAGS.items():
        field_argument(g, TensorRTConfig, name, flag, dest=f"trt_{name}")


def tensorrt_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TensorRTConfig values given on the command line (fields without a flag keep their
    defaults)."""
    return {name: getattr(args, f"trt_{name}") for name in TENSORRT_FLAGS if hasattr(args, f"trt_{name}")}


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
        **{name: getattr(args, name) for name in DETECTOR_FLAGS if hasattr(args, name)},
        "storage": storage_config(args),
        "tensorrt": tensorrt_options(args),
        "torch": torch_options(args),
        **overrides,
    }
    return validate(DetectorConfig, data, "detector")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydetect", description="YOLO object detection over images and video with Ray"
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's own output (start-up, Ray Data's execution plan and "
                             "progress tables), which is hidden by default")
    sub = parser.add_subparsers(dest="command", required=True)
    for _, module in SUBCOMMANDS:
        importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from raydetect.ray_logging import set_verbose

    set_verbose(args.verbose)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except RaydetectError as e:  # user-facing: config, model, engine, dataset, resources, storage
        print(f"raydetect {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except (FileNotFoundError, FileExistsError) as e:
        print(f"raydetect {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from raydetect.storage import storage_failure

        if isinstance(e, TimeoutError):
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
