"""Real `raydetect serve` processes and real (slow, hostile) HTTP clients on 127.0.0.1, shared
by tests/serve/test_serve_isolation.py and benchmarks/serve_reliability.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import MODELS, REPO, free_port
from tests.local_cluster import session_pids

MODEL = str(MODELS / "yolov8n-defects.onnx")


@dataclass
class Instance:
    """One `raydetect serve` subprocess: its own session (so its Ray processes can be found
    and stopped by session id), port, API key and a marker (its max batch size, shown by
    /v1/model) that tells which instance answered."""

    name: str
    port: int
    key: str
    marker: int
    proc: subprocess.Popen
    log: Path
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"X-API-Key": self.key}

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def replica_pids(self) -> list[int]:
        """Pids of this instance's Serve replicas (from /proc: same session, replica command)."""
        out = []
        for pid in session_pids(self.proc.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(b"ray::ServeReplica"):
                out.append(pid)
        return out


def start_instance(name: str, tmp: Path, key: str, marker: int, extra: list[str] = (), *,
                   repo: Path = REPO, env: dict[str, str] | None = None) -> Instance:
    """``raydetect serve`` of the checkout ``repo`` (another one: a before/after comparison)."""
    port = free_port()
    env_var = f"RAYDETECT_{name.upper()}_KEY"
    env = {**os.environ, "RAY_ADDRESS": "local", env_var: key, **(env or {})}
    if repo != REPO:
        env["PYTHONPATH"] = str(repo)
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "raydetect.cli", "serve", "--model", MODEL, "--port", str(port),
           "--name", name, "--num-cpus", "0.5", "--api-key-env", env_var,
           "--max-batch-size", str(marker), "--batch-wait-ms", "2", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return Instance(name, port, key, marker, proc, log, list(extra))


def wait_ready(inst: Instance, timeout_s: float = 240) -> None:
    """Until the instance answers /v1/model with its own marker and has printed its ready line."""
    deadline = time.monotonic() + timeout_s
    while True:
        if inst.proc.poll() is not None:
            raise RuntimeError(f"{inst.name} exited early:\n{inst.text()}")
        try:
            r = httpx.get(inst.url + "/v1/model", headers=inst.auth, timeout=5)
            if r.status_code == 200 and r.json()["max_batch_size"] == inst.marker and "Ctrl-C stops" in inst.text():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{inst.name} not serving after {timeout_s} s:\n{inst.text()}")
        time.sleep(1)


def stop_instance(inst: Instance, timeout_s: float = 120) -> int | None:
    """Ctrl-C, then (only if it does not stop) SIGKILL of its session. Returns its exit code."""
    if inst.proc.poll() is None:
        inst.proc.send_signal(signal.SIGINT)
        try:
            inst.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
    code = inst.proc.poll()
    for pid in session_pids(inst.proc.pid):  # what a failed stop left behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if code is None:
        inst.proc.wait()
    return code


def classify(inst: Instance, others: list[Instance], r: httpx.Response) -> str:
    """'own' (answered by ``inst``), 'cross' (by another instance: its key or marker),
    or the status class of what came back ('5xx', '4xx')."""
    if r.status_code == 200:
        marker = r.json().get("max_batch_size")
        if marker == inst.marker:
            return "own"
        return "cross" if any(marker == o.marker for o in others) else "other"
    if r.status_code == 401:  # the right key was sent: only another instance refuses it
        return "cross"
    return f"{r.status_code // 100}xx"


async def probe(insts: list[Instance], seconds: float, stop_when=None, loops: int = 1) -> dict[str, dict[str, int]]:
    """Each instance gets /v1/model requests (with its own key) from ``loops`` closed loops for
    ``seconds`` (or until ``stop_when()``); counts by :func:`classify`. While an instance has
    no replica its requests wait (Serve's fallback proxy holds them): more loops, more
    requests in flight across the restart."""
    counts = {i.name: {} for i in insts}
    end = time.monotonic() + seconds

    async def loop(inst: Instance) -> None:
        others = [o for o in insts if o is not inst]
        async with httpx.AsyncClient(base_url=inst.url, timeout=30) as c:
            while time.monotonic() < end and not (stop_when and stop_when()):
                try:
                    kind = classify(inst, others, await c.get("/v1/model", headers=inst.auth))
                except httpx.HTTPError as e:
                    kind = "conn-error:" + type(e).__name__
                counts[inst.name][kind] = counts[inst.name].get(kind, 0) + 1
                await asyncio.sleep(0.02)

    await asyncio.gather(*(loop(i) for i in insts for _ in range(loops)))
    return counts


# --- slow clients ----------------------------------------------------------------------------


async def slow_client(port: int, kind: str, key: str, interval_s: float, give_up_s: float) -> tuple[int | None, float]:
    """A client that trickles one byte every ``interval_s``: ``headers`` (the request line and
    headers never complete), ``body`` (full headers, a 50 kB body never completes) or
    ``fast-body`` (headers and 20 kB at once, more than HAProxy buffers, then one byte at a
    time: it reaches the replica). Returns (HTTP status the server answered, seconds until
    it did), (None, give_up_s) when nothing came back."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\n"
            "Content-Type: image/jpeg\r\nContent-Length: 50000\r\n\r\n").encode()
    if kind == "headers":
        pending = head
    elif kind == "body":
        writer.write(head)
        pending = b"\xff" * 50000
    else:
        writer.write(head + b"\xff\xd8" + b"\0" * 19998)
        pending = b"\0" * 30000
    read = asyncio.ensure_future(reader.readline())
    try:
        i = 0
        while time.monotonic() - t0 < give_up_s:
            if read.done():
                break
            try:
                writer.write(pending[i:i + 1])
                await writer.drain()
            except (ConnectionError, OSError):
                pass  # the server closed its side: the answer (if any) is in the read buffer
            i += 1
            done, _ = await asyncio.wait({read}, timeout=interval_s)
        if not read.done():
            return None, give_up_s
        line = read.result()
        elapsed = time.monotonic() - t0
        parts = line.split()
        return (int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None), elapsed
    except (ConnectionError, OSError):
        return None, time.monotonic() - t0
    finally:
        read.cancel()
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
