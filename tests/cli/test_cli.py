"""The command line is generated from the config models: walk every subcommand's options and
check that each flag of a config field round-trips (flag → the config the command hands to its
domain function → the field holds the value), and that each command's flags are its fields."""

from __future__ import annotations

import argparse
import types
import typing
from types import SimpleNamespace

import annotated_types
import pytest
from pydantic import BaseModel

from raydetect.cli import bench as cli_bench
from raydetect.cli import build as cli_build
from raydetect.cli import build_parser
from raydetect.cli import compress as cli_compress
from raydetect.cli import detect as cli_detect
from raydetect.cli import eval as cli_eval
from raydetect.cli import nncf_quantize as cli_nncf_quantize
from raydetect.cli import plan as cli_plan
from raydetect.cli import quantize as cli_quantize
from raydetect.cli import serve as cli_serve
from raydetect.config import ConfigError

#: command → (the function that builds the config its domain function receives, required argv)
COMMANDS = {
    "detect": (cli_detect.job_config, ["--input", "in", "--output", "out", "--model", "/m.onnx"]),
    "build": (lambda a: SimpleNamespace(detector=cli_build.build_config(a)), ["--model", "/m.onnx"]),
    "serve": (cli_serve.serve_config, ["--model", "/m.onnx"]),
    "eval": (cli_eval.eval_config, ["--model", "/m.onnx", "--data", "data"]),
    "quantize": (cli_quantize.quantize_config, ["--model", "/m.onnx", "--calib", "calib", "--out", "o.onnx"]),
    "compress": (cli_compress.compress_config, ["--checkpoint", "m.pt", "--data", "d.yaml", "--out", "o"]),
    "nncf-quantize": (cli_nncf_quantize.nncf_quantize_config, ["--model", "/m.onnx", "--calib", "c", "--out", "o.onnx"]),
    "bench": (cli_bench.bench_config, ["--model", "/m.onnx"]),
    "plan": (cli_plan.plan_config, ["--streams", "4", "--fps", "5", "--per-gpu-fps", "100"]),
}

#: values for fields a generated value would not fit (patterns, paths, cross-field rules)
EXPLICIT: dict[str, tuple[list[str], object]] = {
    "model": (["/other.onnx"], "/other.onnx"),
    "device": (["cuda:1"], "cuda:1"),
    "route_prefix": (["/v2"], "/v2"),
    "api_key_env": (["RD_KEY"], "RD_KEY"),
    "via_serve": (["app2"], "app2"),
    "name": (["app2"], "app2"),
    "exclude": (["/a/Conv", "/b/Conv"], ("/a/Conv", "/b/Conv")),
    "ignore": (["model.9", "model.22"], ("model.9", "model.22")),
    "extensions": ([".abc,.def"], (".abc", ".def")),
    "compile_batches": (["1,4"], (1, 4)),
    "batch_sizes": (["1,4"], (1, 4)),
    "key": (["RD_TEST_KEY_VAR"], "the-key"),
    "secret": (["RD_TEST_SECRET_VAR"], "the-secret"),
}

#: spellings of a field the model itself converts: dest → (argv value, check on the config)
SPELLINGS = {
    ("serve", "replicas"): (["2:3"], lambda c: (c.min_replicas, c.max_replicas) == (2, 3)),
    ("serve", "batch_wait_ms"): (["7"], lambda c: abs(c.batch_wait_timeout_s - 0.007) < 1e-12),
}


def _unwrap(ann):
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(ann) if a is not type(None)]
        return inner[0]
    return ann


def _bounds(field):
    lo = hi = None
    for m in field.metadata:
        if isinstance(m, annotated_types.Ge):
            lo = m.ge
        elif isinstance(m, annotated_types.Gt):
            lo = m.gt + (1 if isinstance(m.gt, int) else 1e-3)
        elif isinstance(m, annotated_types.Le):
            hi = m.le
        elif isinstance(m, annotated_types.Lt):
            hi = m.lt
    return lo, hi


def _value(name: str, field, default) -> tuple[list[str], object]:
    """argv values and the expected field value, different from this command's default."""
    if name in EXPLICIT:
        return EXPLICIT[name]
    kind = _unwrap(field.annotation)
    if typing.get_origin(kind) is typing.Literal:
        choice = next(c for c in typing.get_args(kind) if c != default)
        return [str(choice)], choice
    lo, hi = _bounds(field)
    if kind is int:
        v = (default + 1) if default is not None else (lo if lo is not None else 1) + 1
        if hi is not None and v > hi:
            v = default - 1
        return [str(v)], v
    if kind is float:
        if default is None:
            v = (lo or 0.0) + 0.5
        elif hi is not None and default + 0.5 > hi:
            v = (default + (lo or 0.0)) / 2
        else:
            v = default + 0.5
        return [repr(v)], v
    if kind is str:
        return [f"x-{name}"], f"x-{name}"
    raise AssertionError(f"no test value for {name}: {field.annotation}")


def _field_at(config, dest: str):
    """(field info, value) of the dotted ``dest`` in the built config."""
    obj = config
    *parents, leaf = dest.split(".")
    for p in parents:
        obj = getattr(obj, p)
    assert isinstance(obj, BaseModel), dest
    return type(obj).model_fields[leaf], getattr(obj, leaf)


def _without(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag`` and its value (a required option given another value)."""
    if flag not in argv:
        return argv
    i = argv.index(flag)
    return argv[:i] + argv[i + 2:]


def _subparsers():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub.choices


def test_every_subcommand_is_covered_and_has_help(capsys):
    parser, choices = _subparsers()
    assert set(choices) == set(COMMANDS)
    for name in choices:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([name, "--help"])
        assert e.value.code == 0
        assert f"usage: raydetect {name}" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_flag_round_trips_to_the_config(command, monkeypatch):
    monkeypatch.setenv("RD_TEST_KEY_VAR", "the-key")
    monkeypatch.setenv("RD_TEST_SECRET_VAR", "the-secret")
    parser, choices = _subparsers()
    make, required = COMMANDS[command]
    base = make(parser.parse_args([command, *required]))
    checked = []
    for action in choices[command]._actions:
        if not action.option_strings or action.dest in ("help",) or action.dest.startswith("_"):
            continue
        if action.default is argparse.SUPPRESS:  # deprecated spellings: tested where they are kept
            continue
        flag = action.option_strings[0]
        if (command, action.dest) in SPELLINGS:
            values, check = SPELLINGS[command, action.dest]
            assert check(make(parser.parse_args([command, *required, flag, *values]))), flag
            checked.append(flag)
            continue
        field, default_value = _field_at(base, action.dest)
        if isinstance(action, argparse.BooleanOptionalAction):
            expected = not default_value
            argv = [f"--{'no-' if default_value else ''}{flag[2:]}"]
        elif isinstance(action, argparse._StoreFalseAction):
            expected, argv = False, [flag]
        elif isinstance(action, argparse._StoreTrueAction):
            expected, argv = True, [flag]
        else:
            values, expected = _value(action.dest.rsplit(".", 1)[-1], field, default_value)
            argv = [flag, *values]
        assert expected != default_value, (flag, expected)
        argv = [command, *_without(required, flag), *argv]
        try:
            config = make(parser.parse_args(argv))
        except ConfigError as e:  # pragma: no cover - names the flag whose test value is invalid
            raise AssertionError(f"{command} {flag} {argv}: {e}") from None
        _, got = _field_at(config, action.dest)
        assert got == expected, (command, flag, got, expected)
        checked.append(flag)
    assert len(checked) >= 5, checked


def test_flags_are_generated_from_the_fields():
    """Every detector field of the shared group has its flag in each engine command, with the
    field's own default; eval changes only the defaults it documents."""
    from raydetect.cli.common import DETECTOR_FLAGS
    from raydetect.config import DetectorConfig

    _, choices = _subparsers()
    for command in ("detect", "serve", "eval", "bench"):
        flags = {a.dest: a for a in choices[command]._actions}
        for name in DETECTOR_FLAGS:
            action = flags[f"detector.{name}"]
            if command == "eval" and name in ("conf", "iou", "max_det"):
                continue
            field = DetectorConfig.model_fields[name]
            assert action.default == (None if field.is_required() else field.default), (command, name)


def test_a_missing_key_variable_is_a_clear_error(capsys):
    from raydetect.cli import main

    code = main(["serve", "--model", "/m.onnx", "--key-env", "RD_SURELY_UNSET_VARIABLE"])
    assert code == 2
    assert "environment variable RD_SURELY_UNSET_VARIABLE is not set" in capsys.readouterr().err


def test_a_bad_value_names_the_field():
    parser, _ = _subparsers()
    with pytest.raises(ConfigError, match=r"job\.detector\.conf"):
        cli_detect.job_config(parser.parse_args(["detect", *COMMANDS["detect"][1], "--conf", "3"]))
    with pytest.raises(ConfigError, match=r"fps .* or every"):
        cli_detect.job_config(parser.parse_args(["detect", *COMMANDS["detect"][1], "--fps", "2", "--every", "3"]))
