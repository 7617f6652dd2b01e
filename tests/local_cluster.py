"""A `ray start --head` cluster on this machine that can be stopped without touching other Ray
instances (tests, demos): it runs in its own session and temp dir, and is stopped by signalling
the processes of that session by id — `ray stop` would stop every Ray instance of the user."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is ``sid`` (Linux /proc). Ray workers move to process groups of
    their own, so the session, not the group, is what holds a cluster together."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            out.append(int(entry))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_port_args() -> list[str]:
    """Free ports for the services whose default ports are fixed (ray client 10001, dashboard
    agent 52365, …), so this head does not collide with other Ray instances on the machine."""
    names = ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "runtime-env-agent-port")
    return [f"--{n}={free_port()}" for n in names]


def start_head(args: list[str], *, env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start --head --block ARGS`` (plus :func:`private_port_args`) in a new session; its
    pid is the session id."""
    with open(log, "w") as out:
        return subprocess.Popen(
            ["ray", "start", "--head", "--block", *args, *private_port_args()],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def stop_session(sid: int, grace_s: float = 15.0) -> None:
    """SIGTERM every process of session ``sid``, then SIGKILL those still there after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while time.time() < deadline and session_pids(sid):
            time.sleep(0.5)
        if not session_pids(sid):
            return
