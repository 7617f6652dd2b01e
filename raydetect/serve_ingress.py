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
    os.environ.update(env)
    return env


def ingress_from_env(environ: dict[str, str] | None = None) -> str:
    """The mode an environment selects (how Ray's processes started from it will serve)."""
    environ = os.environ if environ is None else environ
    return "haproxy" if environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1" else "proxy"
