"""How HTTP requests reach the endpoint's replicas: Ray Serve's two ingress modes.

* ``haproxy`` (default): Ray Serve's high-throughput mode (Ray >= 2.56). HAProxy listens on
  the HTTP port of every node and forwards each request straight to an HTTP server inside a
  replica ("direct ingress"); ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` also runs the handler on the
  replica's own event loop. With four replicas per GPU it keeps the endpoint's p99 under 30 ms
  at 32 clients on an H200 (``benchmarks/results/serve_load_gpu.md``).
* ``proxy``: the classic Python proxy actor per node, which hands every request to a replica
  through a Ray actor call. On the H200 one client waited 21.3 ms per request behind it
  against 12.1 ms behind HAProxy, and at 32 clients one replica answered 217 requests/s
  against 453 (``serve_load_gpu_ingress.md``).

Both are cluster-wide settings read from the environment when Ray's processes start, so they
must be set before ``ray start`` / ``ray.init`` (``cluster.yaml`` and the KubeRay manifests
set them for clusters). ``raydetect serve`` and ``benchmarks/serve_load.py`` set them for the
local Ray instance they start.
"""

from __future__ import annotations

import os
from pathlib import Path

INGRESS_MODES = ("haproxy", "proxy")

#: Environment of Ray's processes for each mode.
INGRESS_ENV: dict[str, dict[str, str]] = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
}

#: With direct ingress Serve keeps a stopping replica draining for at least this long (Ray's
#: default is 30 s, so that load balancers notice); a single-node instance that stops as a
#: whole does not need that wait.
DRAIN_ENV = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"

#: Serve gives a starting proxy (HAProxy's manager actor too) this long to report ready, then
#: kills it, and ``serve.start`` fails with ``ActorDiedError``; HAProxy itself gets
#: ``RAY_SERVE_HAPROXY_STARTUP_TIMEOUT_S`` to take over its admin socket. Ray's 5 s and 30 s
#: were too short on a loaded 2-core machine with two instances starting (CI, 2026-12-05; the
#: suite beside two helpers' jobs, 2026-12-07). ``serve.start`` itself waits at most 60 s
#: (Ray's HTTP_PROXY_TIMEOUT), so both are set to that unless the user set their own.
READY_ENV = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
HAPROXY_STARTUP_ENV = "RAY_SERVE_HAPROXY_STARTUP_TIMEOUT_S"
READY_TIMEOUT_S = 60


def ingress_env(mode: str, *, drain_s: float | None = None) -> dict[str, str]:
    """The environment variables that select ``mode`` (and, with ``drain_s``, the drain
    period of stopping replicas)."""
    if mode not in INGRESS_ENV:
        raise ValueError(f"ingress must be one of {', '.join(INGRESS_MODES)} (got {mode!r})")
    env = dict(INGRESS_ENV[mode])
    if drain_s is not None:
        env[DRAIN_ENV] = f"{drain_s:g}"
    return env


def use_ingress(mode: str, *, drain_s: float | None = None) -> dict[str, str]:
    """Select ``mode`` for the Ray instance this process is about to start (Ray's processes
    inherit this environment). A drain period the user already set is kept. Returns what was
    set. It has no effect on a cluster that is already running."""
    env = ingress_env(mode, drain_s=drain_s)
    if DRAIN_ENV in os.environ:
        env.pop(DRAIN_ENV, None)
    for name in (READY_ENV, HAPROXY_STARTUP_ENV):
        if name not in os.environ:
            env[name] = str(READY_TIMEOUT_S)
    os.environ.update(env)
    return env


def ingress_from_env(environ: dict[str, str] | None = None) -> str:
    """The mode an environment selects (how Ray's processes started from it will serve)."""
    environ = os.environ if environ is None else environ
    return "haproxy" if environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1" else "proxy"


# --- isolation of one instance on a shared host ---------------------------------------------
#
# Serve's HAProxy ingress uses host-wide fixed ports: the fallback proxy (127.0.0.1:8500, where
# HAProxy sends requests while an app has no replica), HAProxy's stats page (8404) and exporter
# (9101), and replica ports handed out from 30000 up. Two Ray instances on one host then share
# them: during a replica restart one instance's HAProxy forwards to the other's fallback proxy
# or to a replica that took over a freed port — the other application answers. Each instance
# that ``raydetect serve`` starts gets a private block of ports instead (:func:`reserve_ports`)
# and a private directory for HAProxy's files.

#: Where private blocks are taken from: below Ray's replica range (30000-31000) and below the
#: usual ephemeral range (32768-60999), so neither another Ray nor an outgoing connection
#: lands in one.
BLOCK_RANGE = (20000, 30000)
_held_locks: list = []  # lock files of the blocks this process holds (kept open until exit)


def replica_ports(max_replicas: int) -> int:
    """Replica ports of a block: a freed port stays quarantined (~150 s), so restarts need
    fresh ones."""
    return 4 * max_replicas + 8


def block_size(max_replicas: int) -> int:
    """Fallback HTTP + gRPC ports, then replica HTTP and gRPC ports."""
    return 2 + 2 * replica_ports(max_replicas)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def reserve_ports(size: int, base: int | None = None) -> int:
    """The first port of ``size`` consecutive free ports reserved for this process: an
    exclusive ``flock`` per block in a per-user directory makes concurrent ``raydetect serve``
    processes take different blocks (the lock goes with the process). ``base`` given: that
    block, checked free."""
    import fcntl
    import random
    import tempfile

    lock_dir = Path(tempfile.gettempdir()) / f"raydetect-ports-{os.getuid()}"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    lo, hi = BLOCK_RANGE
    if base is not None:
        candidates = [base]
    else:
        candidates = list(range(lo, hi - size, size))
        random.shuffle(candidates)
    for start in candidates:
        f = open(lock_dir / f"{start}.lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        if all(_port_free(p) for p in range(start, start + size)):
            _held_locks.append(f)
            return start
        f.close()
    where = f"ports {base}-{base + size - 1}" if base is not None else f"a block of {size} free ports in {lo}-{hi}"
    raise OSError(f"serve.ports_base: {where} not free")


def isolation_env(
    base: int,
    max_replicas: int,
    private_dir: Path,
    *,
    stats: str = "",
    metrics: str = "",
    read_timeout_s: float | None = None,
) -> dict[str, str]:
    """Environment of the Ray processes for an instance with the port block at ``base`` and
    HAProxy's files in ``private_dir`` (made 0700: the admin socket is reachable by this user
    only). ``stats``/``metrics``: ``host:port`` of HAProxy's stats page and exporter, empty for
    none; ``read_timeout_s``: HAProxy's deadline for a request's headers (and buffered body)."""
    from raydetect.serve import haproxy as serve_haproxy

    private_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_dir.chmod(0o700)
    n = replica_ports(max_replicas)
    haproxy_dir = private_dir / "h"  # short: socket paths (+ node id) must fit 108 bytes
    env = {
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(base),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(base + 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base + 2),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + 1 + n),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(base + 2 + n),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(base + 1 + 2 * n),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(haproxy_dir / "metrics.sock"),
        serve_haproxy.ENV_STATS: stats,
        serve_haproxy.ENV_METRICS: metrics,
    }
    try:
        env[serve_haproxy.ENV_BINARY] = serve_haproxy.real_binary()
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = str(serve_haproxy.write_wrapper(private_dir))
    except FileNotFoundError:  # no HAProxy here: the proxy ingress still gets its ports
        pass
    if read_timeout_s is not None:
        env[serve_haproxy.ENV_READ_TIMEOUT_MS] = str(max(1, round(read_timeout_s * 1e3)))
    return env


def isolate(cfg, private_dir: Path) -> str:
    """Reserve this instance's ports and set :func:`isolation_env` from a
    :class:`~raydetect.config.ServeConfig` for the Ray instance about to start; returns a
    line that says what was set."""
    base = reserve_ports(block_size(cfg.max_replicas), cfg.ports_base)
    stats = f"{cfg.host}:{cfg.haproxy_stats_port}" if cfg.haproxy_stats_port else ""
    metrics = f"{cfg.host}:{cfg.haproxy_metrics_port}" if cfg.haproxy_metrics_port else ""
    os.environ.update(isolation_env(base, cfg.max_replicas, private_dir, stats=stats, metrics=metrics,
                                    read_timeout_s=cfg.read_timeout_s))
    size = block_size(cfg.max_replicas)
    return (f"private ports {base}-{base + size - 1}, HAProxy stats {stats or 'off'}, "
            f"metrics {metrics or 'off'}")
