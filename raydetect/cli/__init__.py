"""The ``raydetect`` command line: one module per command (``raydetect.cli.<command>``), each
providing ``add_cli(subparsers)`` and building its command's config from flags generated from the
config models (:mod:`raydetect.cli.common`). Domain modules take config objects and know nothing
of argparse."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from raydetect.errors import RaydetectError

#: subcommand → module providing ``add_cli(subparsers)``; imported at start-up, so they stay
#: light (Ray, torch and ONNX Runtime load inside the command functions).
SUBCOMMANDS: list[tuple[str, str]] = [
    ("detect", "raydetect.cli.detect"),
    ("build", "raydetect.cli.build"),
    ("serve", "raydetect.cli.serve"),
    ("eval", "raydetect.cli.eval"),
    ("quantize", "raydetect.cli.quantize"),
    ("compress", "raydetect.cli.compress"),
    ("nncf-quantize", "raydetect.cli.nncf_quantize"),
    ("bench", "raydetect.cli.bench"),
    ("plan", "raydetect.cli.plan"),
]


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


def _fail(command: str, message: str, code: int) -> int:
    print(f"raydetect {command}: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser.parse_args(argv)
    except RaydetectError as e:  # raised by an option's action (e.g. --key-env naming an unset variable)
        command = next((a for a in argv if not a.startswith("-")), "")
        return _fail(command, str(e), e.exit_code)
    from raydetect.ray_logging import set_verbose

    set_verbose(args.verbose)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except RaydetectError as e:  # user-facing: config, model, engine, dataset, resources, storage
        return _fail(args.command, str(e), e.exit_code)
    except (FileNotFoundError, FileExistsError) as e:
        return _fail(args.command, str(e), 2)
    except Exception as e:
        from raydetect.storage import storage_failure

        if isinstance(e, TimeoutError):
            return _fail(args.command, str(e), 3)
        reason = storage_failure(e)
        if reason is not None:
            return _fail(args.command, f"storage unavailable: {reason}; fix the storage and re-run the same "
                         "command", 3)
        raise


if __name__ == "__main__":
    sys.exit(main())
