"""Issue 13, serve side: instances on one host stay apart, slow clients get deadlines, decoded
pixels in flight are bounded. Real `raydetect serve` processes, real Ray Serve, real HTTP on
127.0.0.1 (free ports); the figures of docs/reliability.md come from
benchmarks/serve_reliability.py, which runs the same harness longer."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import statistics
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from fastapi import HTTPException

from raydetect.serve.haproxy import harden
from raydetect.serve.http import PixelBudget
from tests.conftest import DEFECTS, SERVE_READ_TIMEOUT_S, free_port
from tests.serve_harness import MODEL, probe, slow_client, start_instance, stop_instance, wait_ready

KEY_ENV = "RAYDETECT_TEST_ISOLATION_KEY"
os.environ.setdefault(KEY_ENV, "key-" + secrets.token_hex(16))
KEY = os.environ[KEY_ENV]
AUTH = {"X-API-Key": KEY}
IMAGE = sorted((DEFECTS / "images" / "test").iterdir())[0]


# --- two `raydetect serve` instances on one host ------------------------------------------------


def test_two_instances_never_answer_each_other(tmp_path):
    """Two instances (own Ray each, different keys); one's replica is killed (SIGKILL) while
    both are probed: every answer comes from the instance asked, and the killed one recovers."""
    a = start_instance("alpha", tmp_path, "key-a-" + secrets.token_hex(8), 4)
    b = start_instance("beta", tmp_path, "key-b-" + secrets.token_hex(8), 8)
    try:
        wait_ready(a)
        wait_ready(b)
        for inst in (a, b):  # neither serves HAProxy's stats page or exporter, nor the shared 8500
            assert "HAProxy stats off, metrics off" in inst.text()
        replicas = a.replica_pids()
        assert len(replicas) == 1, replicas
        before = asyncio.run(probe([a, b], 3))
        os.kill(replicas[0], 9)
        t_kill = time.monotonic()

        def a_back() -> bool:  # a new replica of alpha runs and a few seconds have passed since
            return time.monotonic() - t_kill > 8 and bool(set(a.replica_pids()) - set(replicas))

        during = asyncio.run(probe([a, b], 90, stop_when=a_back, loops=8))
        after = asyncio.run(probe([a, b], 3))
        for phase in (before, during, after):
            for name, counts in phase.items():
                assert counts.get("cross", 0) == 0 and counts.get("other", 0) == 0, (name, phase)
        assert before["alpha"].get("own", 0) > 0 and after["alpha"].get("own", 0) > 0, (before, after)
        assert set(during["beta"]) == {"own"}, during  # the other instance did not notice
        assert sum(during["alpha"].values()) >= 8, during  # each loop's request got an answer
        r = httpx.post(a.url + "/v1/detect", content=IMAGE.read_bytes(), timeout=60,
                       headers={**a.auth, "Content-Type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["detections"], r.text
    finally:
        codes = [stop_instance(a), stop_instance(b)]
    assert codes == [0, 0], a.text()[-3000:] + b.text()[-3000:]


# --- one instance in this process: slow clients, admission ---------------------------------------


def app_args(**extra):
    return {"model": MODEL, "api_key_env": KEY_ENV, "num_cpus": 0.5, "max_batch_size": 4,
            "batch_wait_ms": 2, "read_timeout_s": SERVE_READ_TIMEOUT_S, **extra}


@pytest.fixture(scope="module")
def server(ray_local):
    from ray import serve

    from raydetect.serve.app import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(app_args()), name="rdiso", route_prefix="/")
    try:
        yield port
    finally:
        serve.shutdown()


def haproxy_config_dir() -> Path:
    base = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]).parent
    (node,) = [d for d in base.iterdir() if d.is_dir()]
    return node


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def listening_ports(pid: int) -> set[int]:
    """TCP ports process ``pid`` listens on (any address), from /proc."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return set()
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in _read(table).decode().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def test_haproxy_is_hardened(server):
    """The session's HAProxy (started as `raydetect serve` starts it): no stats page or
    exporter, the admin socket owner-only inside a 0700 directory, a read deadline."""
    if not os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH"):
        pytest.skip("no HAProxy binary here")
    d = haproxy_config_dir()
    # What the running HAProxy processes listen on: the HTTP port only (no 8404/9101).
    haproxies = [pid for pid in filter(str.isdigit, os.listdir("/proc"))
                 if str(d / "haproxy.cfg").encode() in _read(f"/proc/{pid}/cmdline").split(b"\0")]
    assert haproxies
    assert set().union(*(listening_ports(int(pid)) for pid in haproxies)) == {server}
    # The file on disk: Ray rewrites it before each reload and the wrapper edits it just
    # after, so read it until the edit is there.
    deadline = time.monotonic() + 30
    while "mode 600 level admin" not in (cfg := (d / "haproxy.cfg").read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "listen stats" not in cfg and "prometheus" not in cfg
    assert "mode 600 level admin" in cfg and "mode 666" not in cfg
    assert f"timeout http-request {round(SERVE_READ_TIMEOUT_S * 1e3)}ms" in cfg
    sock = d / "admin.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
    private = Path(os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]).parent
    assert stat.S_IMODE(private.stat().st_mode) == 0o700 and sock.is_relative_to(private)

    # with ports given, the stats page and exporter are bound to the given host only
    opened = harden(cfg + "listen stats\n  bind *:8404\n  stats enable\n",
                    stats="127.0.0.1:19001", metrics="", read_timeout_ms=None)
    assert "bind 127.0.0.1:19001" in opened and "*:8404" not in opened


def test_slow_clients_get_408_and_do_not_hold_the_endpoint(server):
    """72 clients trickling one byte every 2 s (32 in the headers, 32 in a body HAProxy buffers,
    8 in a body larger than its buffer, which reach the replica): all get 408 within the read
    deadline (+ slack), and valid requests meanwhile take at most 2x their idle latency."""
    url = f"http://127.0.0.1:{server}"
    image = IMAGE.read_bytes()

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def valid(n: int) -> list[float]:
                out = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    r = await c.post("/v1/detect", content=image, headers={**AUTH, "Content-Type": "image/jpeg"})
                    assert r.status_code == 200, r.text
                    out.append(time.perf_counter() - t0)
                return out

            await valid(3)  # warm
            idle = await valid(10)  # and 10 more after the slow clients: the host's load drifts
            kinds = ["headers"] * 32 + ["body"] * 32 + ["fast-body"] * 8
            slow = [asyncio.ensure_future(slow_client(server, k, KEY, 2.0, SERVE_READ_TIMEOUT_S + 20))
                    for k in kinds]
            await asyncio.sleep(1.0)  # all connected and trickling
            loaded = await valid(10)
            results = await asyncio.gather(*slow)
            return idle + await valid(10), loaded, kinds, results

    idle, loaded, kinds, results = asyncio.run(run())
    for kind, (status, seconds) in zip(kinds, results, strict=True):
        assert status == 408, (kind, status, seconds)
        assert seconds < SERVE_READ_TIMEOUT_S + 6, (kind, seconds)
    med_idle, med_loaded = statistics.median(idle), statistics.median(loaded)
    assert med_loaded <= 2 * med_idle, (med_idle, med_loaded, loaded)


def big_png(pixels_side: int) -> bytes:
    """A smooth image: a small PNG that decodes to side x side x 3 bytes."""
    y, x = np.mgrid[0:pixels_side, 0:pixels_side]
    img = np.dstack([(x % 256), (y % 256), ((x + y) % 256)]).astype(np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def test_decoded_pixels_in_flight_are_bounded(server):
    """A replica allowed 1.1 decoded images at once: of 12 concurrent 1 MP PNGs some wait and
    get 503 + Retry-After (admission_timeout_s 0.05), the rest 200; nothing else."""
    from ray import serve

    from raydetect.serve.app import app_builder

    serve.run(app_builder(app_args(max_pixels=1_000_000, max_pixels_in_flight=1_100_000,
                                   admission_timeout_s=0.05)),
              name="rdbudget", route_prefix="/budget")
    png = big_png(1000)

    async def fire():
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server}", timeout=120) as c:
            return await asyncio.gather(*(
                c.post("/budget/v1/detect", content=png, headers={**AUTH, "Content-Type": "image/png"})
                for _ in range(12)))

    try:
        responses = asyncio.run(fire())
    finally:
        serve.delete("rdbudget")
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    busy = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "max_pixels_in_flight" in r.json()["detail"] for r in busy)


def test_pixel_budget_waits_first_come_first_served():
    async def run():
        budget = PixelBudget(100, wait_s=1.0)
        a = await budget.acquire(60)
        order = []

        async def take(n, tag):
            got = await budget.acquire(n)
            order.append(tag)
            return got

        t1 = asyncio.ensure_future(take(50, "first"))
        await asyncio.sleep(0)
        t2 = asyncio.ensure_future(take(10, "second"))  # would fit now, but waits its turn
        await asyncio.sleep(0.05)
        assert order == [] and budget.in_use == 60
        budget.release(a)
        got = await asyncio.gather(t1, t2)
        assert order == ["first", "second"] and budget.in_use == 60
        for n in got:
            budget.release(n)
        assert await budget.acquire(10**9) == 100  # capped at the capacity: never starves
        small = PixelBudget(1, wait_s=0.01)
        await small.acquire(1)
        with pytest.raises(HTTPException) as e:
            await small.acquire(1)
        assert small._waiters == [] and small.in_use == 1
        return e.value

    e = asyncio.run(run())
    assert e.status_code == 503 and e.headers["Retry-After"] == "1"
