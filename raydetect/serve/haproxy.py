"""Hardening of the HAProxy that Ray Serve's HAProxy ingress starts, without changing Ray.

Ray Serve 2.60 renders HAProxy's configuration from a fixed template: the stats page
(``bind *:8404``) and the Prometheus exporter (``bind :9101``) listen on every interface without
authentication, the admin socket is created ``mode 666``, and there is no ``timeout
http-request``: a client that sends its headers one byte at a time is held for ``timeout
client`` (3,600 s). Ray lets the HAProxy binary be replaced (``RAY_SERVE_HAPROXY_BINARY_PATH``);
:func:`write_wrapper` installs a small executable there that edits the configuration Ray has
just written (:func:`harden`) and then ``exec``\\ s the real HAProxy with the same arguments
(same pid, same command line, so Ray's process tracking is unchanged). Its settings travel in
the environment of the Ray processes (:data:`ENV_BINARY` …).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ENV_BINARY = "RAYDETECT_HAPROXY_BINARY"  # the real HAProxy
ENV_STATS = "RAYDETECT_HAPROXY_STATS"  # "host:port", or "" to drop the stats page
ENV_METRICS = "RAYDETECT_HAPROXY_METRICS"  # "host:port", or "" to drop the exporter
ENV_READ_TIMEOUT_MS = "RAYDETECT_HAPROXY_READ_TIMEOUT_MS"  # headers (+ buffered body) deadline

_STATS = re.compile(r"^listen stats\n(?:[ \t]+.*\n?)*", re.M)
_METRICS = re.compile(r"^frontend prometheus\n(?:[ \t]+.*\n?)*", re.M)
_BIND = re.compile(r"^([ \t]+bind )\S+", re.M)
_SOCKET_MODE = re.compile(r"^([ \t]*stats socket \S+ mode )\d+", re.M)
_DEFAULTS = re.compile(r"^defaults\n", re.M)
_HTTP_REQUEST = re.compile(r"^[ \t]*timeout http-request .*\n", re.M)


def _section(text: str, pattern: re.Pattern, bind: str) -> str:
    """Drop the section (``bind`` empty) or rebind it to ``bind`` (``host:port``)."""
    if not bind:
        return pattern.sub("", text, count=1)
    return pattern.sub(lambda m: _BIND.sub(lambda b: b.group(1) + bind, m.group(0), count=1), text, count=1)


def harden(text: str, *, stats: str, metrics: str, read_timeout_ms: int | None) -> str:
    """The configuration Ray wrote, with the stats page and exporter dropped or bound to
    ``host:port``, the admin socket owner-only (0600), and ``read_timeout_ms`` as the deadline
    for a request's headers and buffered body (``timeout http-request`` with ``option
    http-buffer-request``: a slow client gets 408 from HAProxy before it reaches a replica)."""
    text = _section(text, _STATS, stats)
    text = _section(text, _METRICS, metrics)
    text = _SOCKET_MODE.sub(lambda m: m.group(1) + "600", text)
    if read_timeout_ms is not None:
        text = _HTTP_REQUEST.sub("", text)
        text = _DEFAULTS.sub(
            f"defaults\n    timeout http-request {read_timeout_ms}ms\n    option http-buffer-request\n",
            text, count=1,
        )
    return text


def main(argv: list[str] | None = None) -> None:
    """The wrapper: harden the file after ``-f``, then become the real HAProxy."""
    argv = list(sys.argv if argv is None else argv)
    real = os.environ[ENV_BINARY]
    if is_wrapper(real):  # never exec a wrapper (it would exec itself forever): fail loudly
        sys.exit(f"raydetect HAProxy wrapper: {ENV_BINARY}={real} is a wrapper, not HAProxy")
    if "-f" in argv[:-1]:
        path = Path(argv[argv.index("-f") + 1])
        timeout = os.environ.get(ENV_READ_TIMEOUT_MS)
        text = harden(
            path.read_text(),
            stats=os.environ.get(ENV_STATS, ""),
            metrics=os.environ.get(ENV_METRICS, ""),
            read_timeout_ms=int(timeout) if timeout else None,
        )
        tmp = path.with_name(path.name + ".raydetect")
        tmp.write_text(text)
        os.replace(tmp, path)
    os.execv(real, [real, *argv[1:]])


#: First line after the interpreter line of every wrapper: how a wrapper is recognised.
WRAPPER_MARK = "# raydetect HAProxy wrapper"


def is_wrapper(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            return WRAPPER_MARK.encode() in f.read(512)
    except OSError:
        return False


def real_binary() -> str:
    """The HAProxy executable a wrapper must run. A process started from an isolated
    environment (a ``raydetect serve`` launched by another one, or by the test suite) inherits
    ``RAY_SERVE_HAPROXY_BINARY_PATH`` pointing at that environment's *wrapper*: following it
    would make the new wrapper exec the old one, which execs itself forever (HAProxy never
    starts). So an inherited wrapper is replaced by the binary it wraps. Raises
    FileNotFoundError when there is no HAProxy."""
    inherited = os.environ.get(ENV_BINARY)
    if inherited and not is_wrapper(inherited) and os.access(inherited, os.X_OK):
        return inherited
    from ray.serve._private.haproxy import get_haproxy_binary

    path = get_haproxy_binary()
    if is_wrapper(path):  # RAY_SERVE_HAPROXY_BINARY_PATH names a wrapper: take Ray's own binary
        saved = os.environ.pop("RAY_SERVE_HAPROXY_BINARY_PATH", None)
        try:
            path = get_haproxy_binary()
        finally:
            if saved is not None:
                os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"] = saved
    if is_wrapper(path):
        raise FileNotFoundError(f"{path} is a raydetect wrapper, not HAProxy")
    return path


def write_wrapper(directory: Path) -> Path:
    """An executable in ``directory`` that runs :func:`main` with this interpreter. It loads
    this file by path (not the raydetect package, whose imports would slow every HAProxy start)."""
    script = directory / "haproxy"
    script.write_text(
        f"#!{sys.executable}\n"
        f"{WRAPPER_MARK}\n"
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('raydetect_serve_haproxy', {str(Path(__file__).resolve())!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "module.main()\n"
    )
    script.chmod(0o700)
    return script
