"""What every ``raydetect`` command shares: flags generated from the config models' fields.

A flag's ``dest`` is the dotted path of its field in the command's root config
(``detector.conf``, ``detector.tensorrt.cache``, ``video.gate``), so :func:`config_values`
turns parsed arguments back into the nested dict the root model validates: each setting has one
name, one default and one validation (the pydantic field), and the flag is derived from it
(``--kebab-name``, the field's default, its description as help). Options that are not settings
of the config (``--overwrite``, ``--out``, ``--json``) have dests starting with ``_``.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from raydetect.config import ConfigError, DetectorConfig, StorageConfig, TensorRTConfig, TorchConfig, validate

#: dests that argparse or :mod:`raydetect.cli` set and that are no config setting
NOT_SETTINGS = {"func", "command", "verbose", "help"}


def _unwrap_optional(ann: Any) -> Any:
    if typing.get_origin(ann) in (typing.Union, types.UnionType):  # X | None → X
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        return inner[0] if len(inner) == 1 else None
    return ann


def _is_model(ann: Any) -> bool:
    ann = _unwrap_optional(ann)
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def comma_list(kind: type):
    """argparse ``type`` for ``1,8,64`` → ``(1, 8, 64)`` (a ``tuple[kind, ...]`` field)."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, e.g. 1,8,64 (got {text!r})"
            ) from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: accepted, with a note on stderr naming the new one.
    ``const`` given: a flag without a value that stores ``const``."""

    def __init__(self, option_strings, dest, new: str, **kwargs) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)
        if "const" in kwargs:
            kwargs["nargs"] = 0
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"raydetect: {option_string} is deprecated, use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def field_argument(group, model: type[BaseModel], name: str, flag: str | None = None, dest: str | None = None,
                   **overrides) -> None:
    """``group.add_argument`` for the pydantic field ``model.name``: ``--kebab-name``, the
    field's default, its description as help; the value is validated by the config model."""
    f = model.model_fields[name]
    kind = _unwrap_optional(f.annotation)
    kwargs: dict[str, Any] = {"dest": dest or name}
    # a command may override the field's default (eval: conf 0.001); the help shows the real one
    default = overrides.pop("default", f.default)
    if f.is_required() and "required" not in overrides:
        kwargs["required"] = True
    elif not f.is_required():
        kwargs["default"] = default
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is typing.Literal:
        kwargs["metavar"] = "{" + ",".join(map(str, typing.get_args(kind))) + "}"
    elif typing.get_origin(kind) is tuple:
        inner = typing.get_args(kind)[0]
        kwargs["type"] = comma_list(inner)
        kwargs["metavar"] = f"{inner.__name__.upper()},..."
    else:
        kwargs["metavar"] = name.upper()
        if kind in (int, float):
            kwargs["type"] = kind
    text = overrides.pop("help", None) or f.description or name.replace("_", " ")
    if not f.is_required() and kwargs.get("action") is not argparse.BooleanOptionalAction:
        shown = default
        if isinstance(default, tuple):
            shown = ",".join(map(str, default)) or "none"
        text += f" (default {'none' if shown is None else shown})"
    kwargs["help"] = text
    kwargs.update(overrides)
    group.add_argument(flag or "--" + name.replace("_", "-"), **kwargs)


def add_fields(parser, model: type[BaseModel], *, path: str = "", title: str | None = None,
               only: Iterable[str] | None = None, skip: Iterable[str] = (), flags: dict[str, str] | None = None,
               defaults: dict[str, Any] | None = None, extra: dict[str, dict[str, Any]] | None = None):
    """One flag per (non-nested) field of ``model``, dest ``path.field``; ``only``/``skip``
    choose fields, ``flags`` renames flags, ``defaults`` overrides defaults for this command and
    ``extra`` passes more ``add_argument`` keywords. Returns the argument group."""
    group = parser.add_argument_group(title) if title else parser
    names = list(only) if only is not None else list(model.model_fields)
    skip = set(skip)
    for name in names:
        if name in skip or _is_model(model.model_fields[name].annotation):
            continue
        kw = dict((extra or {}).get(name, {}))
        if defaults and name in defaults:
            kw["default"] = defaults[name]
        field_argument(group, model, name, (flags or {}).get(name), dest=f"{path}.{name}" if path else name, **kw)
    return group


def config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The nested dict of settings the parsed ``args`` hold (dests split on ``.``)."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest in NOT_SETTINGS or dest.startswith("_"):
            continue
        *parents, leaf = dest.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def config_from_args(model: type[BaseModel], args: argparse.Namespace, prefix: str, **overrides: Any):
    """Validate the root config of a command from its parsed arguments (errors name the field)."""
    data = config_values(args)
    data.update(overrides)
    return validate(model, data, prefix)


# --- shared option groups ------------------------------------------------------------------

#: DetectorConfig fields of the "model and engine" option group → add_argument overrides
DETECTOR_FLAGS: dict[str, dict[str, Any]] = {
    "model": {"help": "YOLO ONNX export (path or s3:// URL)"},
    "engine": {"help": "runtime; auto: the first that can run here (tensorrt > torch > onnxruntime; openvino only when named)"},
    "precision": {"help": "engine precision (int8: a QDQ model from raydetect quantize)"},
    "conf": {},
    "iou": {},
    "max_det": {"help": "max detections per image"},
    "batch_size": {"help": "images per engine call; for TensorRT also the largest batch of the engine profile"},
    "max_pixels": {},
    "max_bytes": {},
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

#: TorchConfig fields (the compiled torch engine) → flag
TORCH_FLAGS: dict[str, str] = {
    "compile": "--compile",
    "compile_batches": "--compile-batches",
    "cache": "--torch-cache",
}


def add_detector_args(p: argparse.ArgumentParser, *, path: str = "detector", fields: Iterable[str] | None = None,
                      defaults: dict[str, Any] | None = None) -> None:
    """The detector options (``fields``: a subset of :data:`DETECTOR_FLAGS`, default all), the
    TensorRT and torch engine options and the storage options, generated from the configs;
    dests under ``path`` (``detector.conf``)."""
    add_fields(p, DetectorConfig, path=path, title="model and engine", only=list(fields or DETECTOR_FLAGS),
               defaults=defaults, extra=DETECTOR_FLAGS)
    add_fields(p, TensorRTConfig, path=f"{path}.tensorrt", only=list(TENSORRT_FLAGS), flags=TENSORRT_FLAGS,
               title="TensorRT engine (same options for build, detect, serve, eval, bench)")
    add_fields(p, TorchConfig, path=f"{path}.torch", only=list(TORCH_FLAGS), flags=TORCH_FLAGS,
               title="torch engine (compiled: inductor + CUDA graphs)")
    add_storage_args(p, path=f"{path}.storage")


#: StorageConfig fields with a flag of their own (key and secret come from environment variables
#: named by --key-env / --secret-env, never from the command line)
STORAGE_FLAGS: dict[str, str] = {
    "endpoint_url": "--endpoint-url",
    "anon": "--anon",
    "region": "--region",
    "connect_timeout_s": "--s3-connect-timeout",
    "read_timeout_s": "--s3-read-timeout",
    "max_attempts": "--s3-max-attempts",
    "max_connections": "--s3-max-connections",
}


class _SecretFromEnv(argparse.Action):
    """``--key-env VAR``: the value of ``$VAR`` (an error naming VAR when it is unset)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if values not in os.environ:
            raise ConfigError(f"storage: environment variable {values} is not set")
        setattr(namespace, self.dest, os.environ[values])


def add_storage_args(p: argparse.ArgumentParser, *, path: str = "storage") -> None:
    g = add_fields(p, StorageConfig, path=path, only=list(STORAGE_FLAGS), flags=STORAGE_FLAGS,
                   title="object storage (s3:// URLs, through s3fs)",
                   defaults={"endpoint_url": os.environ.get("RAYDETECT_S3_ENDPOINT_URL")},
                   extra={"endpoint_url": {"help": "S3-compatible endpoint (env RAYDETECT_S3_ENDPOINT_URL); "
                                                   "default AWS"},
                          "anon": {"help": "anonymous access (public buckets)"},
                          "region": {"help": "S3 region (default: from the environment)"}})
    g.add_argument("--key-env", dest=f"{path}.key", action=_SecretFromEnv, default=None, metavar="VAR",
                   help="read the access key id from this environment variable "
                        "(default: the usual AWS credential chain)")
    g.add_argument("--secret-env", dest=f"{path}.secret", action=_SecretFromEnv, default=None, metavar="VAR",
                   help="read the secret access key from this environment variable")
