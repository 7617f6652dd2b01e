"""``raydetect serve``'s process: start (or join) Ray, run the application, block until Ctrl-C
or SIGTERM, then clean up."""

import logging
import os
import signal
import threading
import time
from pathlib import Path

from ray import serve

from raydetect.config import ServeConfig
from raydetect.serve.app import build_app
from raydetect.serve.http import read_api_key

log = logging.getLogger(__name__)


def _sigterm_as_ctrl_c(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise KeyboardInterrupt


def run_forever(cfg: ServeConfig) -> None:
    """Start (or join) Ray, run the application on ``cfg.host:cfg.port`` and block until
    Ctrl-C; then delete the application (and stop Ray if this call started it)."""
    import tempfile

    import ray

    from raydetect.serve.ingress import isolate, use_ingress

    read_api_key(cfg.api_key_env)  # fail here, not in the replica, when the key is missing
    started_ray = not ray.is_initialized()
    # ray.init() joins a cluster named by RAY_ADDRESS (or started by `ray start`); that one
    # keeps the ingress (and ports) it was started with.
    own_ray = os.environ.get("RAY_ADDRESS", "local") == "local"
    ingress = cfg.ingress if own_ray else "as the cluster was started"
    private = tempfile.TemporaryDirectory(prefix="rds-")
    if started_ray:
        # Read by the Ray processes this call starts; a running cluster keeps its own mode.
        use_ingress(cfg.ingress, drain_s=2.0)
        if own_ray:  # private ports and HAProxy files: other instances on this host stay apart
            ingress += " (" + isolate(cfg, Path(private.name)) + ")"
        from raydetect.ray_logging import init_ray

        init_ray()  # Ray's start-up noise hidden unless -v (raydetect/ray_logging.py)
    # SIGTERM (kill, systemd, docker stop) stops like Ctrl-C: exit 0, no stack dump. Set after
    # ray.init, whose driver handler would exit with status 15.
    # Ctrl-C (SIGINT) stops it too, also when it was started from a non-interactive shell's
    # background job, which starts commands with SIGINT ignored (POSIX) and Python keeps that.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    http_options = {
        "host": cfg.host,
        "port": cfg.port,
        # a backstop behind the replica's own timeout (which answers 504)
        "request_timeout_s": cfg.timeout_s + 10.0,
    }
    try:
        try:
            serve.start(http_options=http_options)
        except (ray.exceptions.RayError, TimeoutError) as e:
            # a proxy too slow to start on a loaded machine is killed and restarted by Serve's
            # controller: wait for the new one once before giving up
            log.warning("raydetect serve: the HTTP proxy did not start (%s); waiting for its restart",
                        str(e).splitlines()[0][:200])
            serve.start(http_options=http_options)
        serve.run(build_app(cfg), name=cfg.name, route_prefix=cfg.route_prefix)
        url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
        print(
            f"raydetect serve: {cfg.detector.model} at {url}/v1/detect "
            f"(OpenAPI: {url}/docs; ingress {ingress}); Ctrl-C stops",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("raydetect serve: stopping", flush=True)
    finally:
        try:
            if started_ray:
                serve.shutdown()
            else:
                serve.delete(cfg.name)
        finally:
            if started_ray:
                ray.shutdown()
            private.cleanup()
