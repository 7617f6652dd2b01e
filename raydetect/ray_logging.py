"""Ray's start-up noise out of the default output of the commands that start Ray.

By default (no ``-v``) :func:`init_ray` keeps out of the terminal and the logs, whether or not
stdout is a terminal:

- Ray's own Python loggers below ERROR (e.g. the token-authentication WARNING at start-up):
  ``ray.init(logging_level=ERROR)``;
- Ray Data's console INFO lines ("Starting execution of Dataset …", "Execution plan …",
  "Progress will be logged …", the periodic operator tables in logs): the ``console`` handler of
  the ``ray.data`` logger is raised to WARNING. Its file handler is left alone, so
  ``<session>/logs/ray-data/`` still has everything;
- the driver's C++ core-worker lines (e.g. ``core_worker.cc: Actor … has constructor
  arguments in the object store and max_restarts > 0``, logged at ERROR for every Ray Data actor
  pool): ``RAY_BACKEND_LOG_LEVEL=fatal`` for this process's core worker only, set while it is
  created and then restored, so the raylet, GCS and workers log as usual.

``raydetect -v CMD`` (:func:`set_verbose`) leaves all of them as Ray has them, at INFO.
Warnings and errors of raydetect itself, and Ray Data warnings, are always shown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

_verbose = False


def set_verbose(verbose: bool) -> None:
    """The CLI's ``-v``: keep Ray's own output (see the module docstring)."""
    global _verbose
    _verbose = bool(verbose)


def verbose() -> bool:
    return _verbose


@contextlib.contextmanager
def _quiet_fd2():
    """fd 2 to /dev/null for the block (C++ writes straight to it); Python's sys.stderr is
    flushed before and after so nothing of ours is lost."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _quiet_driver_core_worker():
    """``RAY_BACKEND_LOG_LEVEL=fatal`` while ray creates this process's core worker (in
    ``ray._private.worker.connect``), and only then: the Ray processes ``ray.init`` starts are
    spawned before and keep the environment they had. Without that hook, nothing changes."""
    import ray._private.worker as rw

    original = getattr(rw, "connect", None)
    if original is None or "RAY_BACKEND_LOG_LEVEL" in os.environ:  # the user's setting wins
        yield
        return

    def connect(*args: Any, **kwargs: Any):
        os.environ["RAY_BACKEND_LOG_LEVEL"] = "fatal"
        try:
            with _quiet_fd2():  # "Set ray log level from environment variable …" (INFO, stderr)
                return original(*args, **kwargs)
        finally:
            os.environ.pop("RAY_BACKEND_LOG_LEVEL", None)

    rw.connect = connect
    try:
        yield
    finally:
        rw.connect = original


def quiet_ray_data() -> None:
    """Raise the console handler of the ``ray.data`` logger to WARNING (its log file keeps
    everything). ``import ray.data`` (re)configures that logger, so it is imported first."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    for h in logging.getLogger("ray.data").handlers:
        if h.get_name() == "console":
            h.setLevel(logging.WARNING)


def init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)``, quiet unless :func:`set_verbose` (see the module docstring)."""
    import ray

    if _verbose:
        kwargs.setdefault("logging_level", logging.INFO)
        ray.init(**kwargs)
        return
    kwargs.setdefault("logging_level", logging.ERROR)
    quiet_ray_data()
    with _quiet_driver_core_worker():
        ray.init(**kwargs)
