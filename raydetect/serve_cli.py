"""``raydetect serve``: the command line of the online endpoint. Light at import (the CLI
imports every subcommand's module at start-up); Ray and FastAPI load when the command runs."""

from __future__ import annotations

import argparse

from raydetect.config import ServeConfig, parse_replicas, validate


def serve_config(args: argparse.Namespace) -> ServeConfig:
    from raydetect.cli import detector_config

    overrides = {} if args.max_bytes is None else {"max_bytes": args.max_bytes}
    low, high = parse_replicas(args.replicas)
    return validate(
        ServeConfig,
        {
            "detector": detector_config(args, **overrides),
            "name": args.name,
            "route_prefix": args.route_prefix,
            "min_replicas": low,
            "max_replicas": high,
            "target_ongoing_requests": args.target_ongoing_requests,
            "max_ongoing_requests": args.max_ongoing_requests,
            "num_cpus": args.num_cpus,
            "num_gpus": args.num_gpus,
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_ms / 1e3,
            "max_files": args.max_files,
            "archive_max_batches": args.archive_max_batches,
            "archive_max_replicas": args.archive_max_replicas,
            "archive_fill": args.archive_fill,
            "timeout_s": args.timeout_s,
            "api_key_env": args.api_key_env,
            "host": args.host,
            "port": args.port,
            "ingress": args.ingress,
            "ports_base": args.ports_base,
            "haproxy_stats_port": args.haproxy_stats_port,
            "haproxy_metrics_port": args.haproxy_metrics_port,
            "read_timeout_s": args.read_timeout_s,
            "max_pixels_in_flight": args.max_pixels_in_flight,
            "admission_timeout_s": args.admission_timeout_s,
        },
        "serve",
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from raydetect.serve import run_forever

    run_forever(serve_config(args))
    return 0


def add_cli(sub) -> None:
    from raydetect.cli import add_detector_args, add_storage_args

    p = sub.add_parser(
        "serve", help="online detection endpoint over HTTP (Ray Serve + FastAPI); blocks until Ctrl-C"
    )
    g = p.add_argument_group("endpoint")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    g.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                   help="HTTP ingress of the Ray instance this command starts: 'haproxy' (Ray Serve's "
                        "high-throughput mode, HAProxy straight to the replicas; default) or 'proxy' "
                        "(the classic Python proxy). A running cluster keeps the mode it was started with")
    g.add_argument("--ports-base", type=int, default=None, metavar="PORT",
                   help="first of this instance's private ports (Serve's fallback proxy, replica ports) "
                        "of the Ray it starts (default: a free block; instances on one host never share)")
    g.add_argument("--haproxy-stats-port", type=int, default=None, metavar="PORT",
                   help="serve HAProxy's stats page on HOST:PORT (default: off)")
    g.add_argument("--haproxy-metrics-port", type=int, default=None, metavar="PORT",
                   help="serve HAProxy's Prometheus exporter on HOST:PORT (default: off)")
    g.add_argument("--read-timeout-s", type=float, default=15.0,
                   help="a client must send request headers and body within this, else 408 (default 15)")
    g.add_argument("--max-pixels-in-flight", type=int, default=160_000_000,
                   help="decoded pixels per replica at once; more wait (default 160e6)")
    g.add_argument("--admission-timeout-s", type=float, default=5.0,
                   help="wait this long for decode room, then 503 + Retry-After (default 5)")
    g.add_argument("--name", default="raydetect", help="Serve application name")
    g.add_argument("--route-prefix", default="/", help="URL prefix of the application (default /)")
    g.add_argument("--replicas", default="1", help="N, or MIN:MAX to autoscale (default 1)")
    g.add_argument("--target-ongoing-requests", type=float, default=16.0,
                   help="autoscaling target of in-flight requests per replica (default 16)")
    g.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="in-flight requests per replica before Serve queues (default 64)")
    g.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    g.add_argument("--num-gpus", type=float, default=0.0,
                   help="GPUs per replica; fractions (0.5) share a GPU with batch actors")
    g.add_argument("--max-batch-size", type=int, default=16,
                   help="requests merged into one engine call (default 16)")
    g.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a batch waits to fill, ms (default 5)")
    g.add_argument("--max-bytes", type=int, default=None,
                   help="larger request bodies / files get 413 (default 64 MiB)")
    g.add_argument("--max-files", type=int, default=32, help="files per /v1/detect/batch request")
    g.add_argument("--archive-max-batches", type=int, default=4,
                   help="archive batches (raydetect detect --via-serve) a replica holds at once (default 4)")
    g.add_argument("--archive-fill", choices=("auto", "on", "off"), default="auto",
                   help="archive images fill the rest of online engine batches (auto: on GPU engines)")
    g.add_argument("--archive-max-replicas", type=int, default=None,
                   help="most replicas archive work alone keeps alive when autoscaling (default: max)")
    g.add_argument("--timeout-s", type=float, default=30.0, help="per-request timeout, then 504")
    g.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="require the API key held in this environment variable "
                        "('Authorization: Bearer <key>' or 'X-API-Key')")
    add_detector_args(p)
    add_storage_args(p)
    p.set_defaults(func=_cmd_serve)
