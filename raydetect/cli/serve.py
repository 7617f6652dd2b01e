"""``raydetect serve``: the online endpoint from the command line; every flag is a field of
:class:`~raydetect.config.ServeConfig` (``detector.*``: its detector's), except ``--replicas``
and ``--batch-wait-ms``, the spellings the model itself accepts for ``min/max_replicas`` and
``batch_wait_timeout_s`` (as ``serve run`` builder args do). Light at import; Ray and FastAPI
load when the command runs."""

from __future__ import annotations

import argparse

from raydetect.cli.common import add_detector_args, add_fields, config_from_args
from raydetect.config import ServeConfig

SERVE_HELP = {
    "host": {"help": "address to listen on"},
    "port": {"help": "HTTP port"},
    "ports_base": {"metavar": "PORT"},
    "haproxy_stats_port": {"metavar": "PORT"},
    "haproxy_metrics_port": {"metavar": "PORT"},
    "api_key_env": {"metavar": "VAR", "help": "require the API key held in this environment variable "
                                             "('Authorization: Bearer <key>' or 'X-API-Key')"},
}


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = add_fields(p, ServeConfig, title="endpoint", skip=("min_replicas", "max_replicas", "batch_wait_timeout_s"),
                   extra=SERVE_HELP)
    g.add_argument("--replicas", default="1", help="N, or MIN:MAX to autoscale (default 1)")
    wait_ms = ServeConfig.model_fields["batch_wait_timeout_s"].default * 1e3
    g.add_argument("--batch-wait-ms", type=float, default=wait_ms,
                   help=f"how long a batch waits to fill, ms (default {wait_ms:g})")
    add_detector_args(p)


def serve_config(args: argparse.Namespace) -> ServeConfig:
    return config_from_args(ServeConfig, args, "serve")


def _cmd_serve(args: argparse.Namespace) -> int:
    from raydetect.serve.launch import run_forever

    run_forever(serve_config(args))
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser(
        "serve", help="online detection endpoint over HTTP (Ray Serve + FastAPI); blocks until Ctrl-C"
    )
    add_serve_args(p)
    p.set_defaults(func=_cmd_serve)
