"""One pool for online and archive work (issue 16): the batch job through a running Serve
application (``--via-serve``), with real Ray, real Serve and real HTTP on 127.0.0.1."""

import shutil
import statistics
import threading
import time

import httpx
import pyarrow.parquet as pq
import pytest

from raydetect.config import ConfigError, DetectorConfig, JobConfig, validate
from raydetect.job import output as sh
from raydetect.job.run import run_job
from raydetect.job.via_serve import ServeAppError, app_handle
from raydetect.types import table_to_results
from tests.conftest import DEFECTS, MODELS, free_port, photo_paths
from tests.reference import as_tuples, assert_same_detections

MODEL = str(MODELS / "yolov8n-defects.onnx")
APP = "pool"
MAX_BATCH = 8


def serve_args(**extra):
    # batch_size = MAX_BATCH: an archive-only engine call (the detector's batch) is one archive batch
    return {"model": MODEL, "num_cpus": 0.25, "max_batch_size": MAX_BATCH, "batch_size": MAX_BATCH,
            "batch_wait_ms": 10,
            "archive_max_batches": 4, "max_pixels": 5_000_000, **extra}


@pytest.fixture(scope="module")
def pool(ray_local):
    from ray import serve

    from raydetect.serve.app import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(serve_args()), name=APP, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Photos, defect images and one bad file: 20 inputs."""
    d = tmp_path_factory.mktemp("pool-in")
    for p in photo_paths() + sorted((DEFECTS / "images" / "test").iterdir())[:12]:
        shutil.copy(p, d / p.name)
    (d / "notes.jpg").write_bytes(b"this is a text file, not a JPEG\n" * 20)
    return d


def job_cfg(inp, out, **extra):
    det = DetectorConfig(model=MODEL, batch_size=4, max_pixels=5_000_000)
    return JobConfig(input=str(inp), output=str(out), detector=det, progress=False, num_cpus=0.25, **extra)


def rows_of(out):
    parts = sorted(str(p) for p in out.glob("part-*.parquet"))
    table = pq.read_table(parts) if parts else None
    return table, ([] if table is None else table_to_results(table))


def test_job_via_serve_writes_the_standalone_rows(pool, inputs, tmp_path):
    alone = run_job(job_cfg(inputs, tmp_path / "alone"))
    served = run_job(job_cfg(inputs, tmp_path / "served", via_serve=APP, rows_per_call=16, shard_size=8))
    assert served.images == alone.images == 20 and served.errors == alone.errors == 1
    _, a_rows = rows_of(tmp_path / "alone")
    table, s_rows = rows_of(tmp_path / "served")
    a, s = {r.uri: r for r in a_rows}, {r.uri: r for r in s_rows}
    assert len(s_rows) == len(s) == 20 and sorted(a) == sorted(s)
    assert sum(len(r.detections) for r in s_rows) > 0
    for uri, ra in a.items():
        rs = s[uri]
        assert (rs.width, rs.height, rs.error) == (ra.width, ra.height, ra.error)
        assert_same_detections(as_tuples(rs.detections), as_tuples(ra.detections))
    manifest = sh.read_manifest(*_local(tmp_path / "served"))
    assert manifest["via_serve"]["app"] == APP
    assert manifest["model_sha256"] == manifest["via_serve"]["model_sha256"] == table.column("model_sha256")[0].as_py()
    assert served.report is not None
    # resume: every shard is done, nothing is sent again
    again = run_job(job_cfg(inputs, tmp_path / "served", via_serve=APP, rows_per_call=16, shard_size=8))
    assert again.processed == 0 and again.shards_skipped == again.shards == 3


def test_requests_stay_within_the_replicas_message_limit(ray_local, inputs, tmp_path):
    """Serve's gRPC transport (the HAProxy ingress) refuses handle calls larger than the
    replica's RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH: the job cuts its archive batches to
    fit, and an image too large to travel alone is an error row; the other rows are the
    standalone job's."""
    from ray import serve

    from raydetect.config import ServeConfig
    from raydetect.job.via_serve import REQUEST_OVERHEAD, connect
    from raydetect.serve.app import DetectorServer, deployment_options

    limit = 200_000
    cfg = validate(ServeConfig, serve_args(), "serve")
    opts = deployment_options(cfg)
    opts["ray_actor_options"]["runtime_env"] = {"env_vars": {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(limit)}}
    app = "poolsmall"
    serve.run(DetectorServer.options(**opts).bind(cfg.model_dump(mode="json")), name=app, route_prefix="/small")
    try:
        _, info = connect(app)
        assert info["max_request_bytes"] == limit
        sizes = {p.name: p.stat().st_size for p in inputs.iterdir()}
        big = sorted(n for n, b in sizes.items() if b > limit - REQUEST_OVERHEAD)
        assert big == ["cat22.jpg"] and sum(sizes.values()) > 3 * limit
        alone = run_job(job_cfg(inputs, tmp_path / "alone"))
        served = run_job(job_cfg(inputs, tmp_path / "served", via_serve=app, rows_per_call=16, shard_size=8))
        assert served.images == alone.images == 20 and served.errors == alone.errors + 1
        a = {r.uri: r for r in rows_of(tmp_path / "alone")[1]}
        s = {r.uri: r for r in rows_of(tmp_path / "served")[1]}
        assert sorted(a) == sorted(s)
        for uri, ra in a.items():
            rs = s[uri]
            if uri.endswith("cat22.jpg"):
                assert rs.error.startswith(f"{sizes['cat22.jpg']} bytes: larger than one request") and not rs.detections
                continue
            assert (rs.width, rs.height, rs.error) == (ra.width, ra.height, ra.error)
            assert_same_detections(as_tuples(rs.detections), as_tuples(ra.detections))
    finally:
        serve.delete(app)


def test_split_requests():
    from raydetect.job.via_serve import REQUEST_OVERHEAD, split_requests

    o = REQUEST_OVERHEAD
    assert split_requests([5, 5, 5], 2, None) == ([[0, 1], [2]], [])
    assert split_requests([10, 30, 25, 50, 5], 8, o + 50) == ([[0, 1], [2], [3], [4]], [])
    assert split_requests([10, 51, 20], 8, o + 50) == ([[0, 2]], [1])
    assert split_requests([], 4, o + 50) == ([], [])


def _local(path):
    import fsspec

    return fsspec.filesystem("file"), str(path)


def test_missing_app_and_other_model_are_refused(pool, inputs, tmp_path):
    with pytest.raises(ServeAppError, match="no such Serve application.*running: pool"):
        run_job(job_cfg(inputs, tmp_path / "a", via_serve="nope"))
    other = JobConfig(input=str(inputs), output=str(tmp_path / "b"), via_serve=APP, progress=False,
                      detector=DetectorConfig(model=str(MODELS / "yolov8n-random.onnx")))
    with pytest.raises(ServeAppError, match="refusing to mix models"):
        run_job(other)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="num_gpus"):
        validate(JobConfig, {"input": "x", "output": "y", "via_serve": APP, "num_gpus": 1,
                             "detector": {"model": MODEL}}, "job")


def _online_latencies(url: str, body: bytes, n: int) -> tuple[list[float], list[dict]]:
    lat, timings = [], []
    with httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post("/v1/detect", content=body, headers={"Content-Type": "image/jpeg"})
            lat.append((time.perf_counter() - t0) * 1e3)
            assert r.status_code == 200, r.text
            timings.append(r.json()["timings"])
    return lat, timings


def _archive_images():
    images = [p.read_bytes() for p in sorted((DEFECTS / "images" / "test").iterdir())[:MAX_BATCH]]
    return images, [f"a{i}.jpg" for i in range(len(images))]


def _engine_batch_ms(handle, images, uris) -> float:
    batch_s = []
    for _ in range(3):  # one engine batch of archive images alone
        t0 = time.perf_counter()
        assert handle.remote(images, uris).result().num_rows == len(images)
        batch_s.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(batch_s)


def _with_backlog(handle, images, uris, settle_s: float, online):
    """Run ``online()`` while the replica holds a backlog of archive batches
    (archive_max_batches = 4 held, one more waiting). Returns its result, the counts of batches
    done and answered busy, the times batches finished and the online window."""
    stop = threading.Event()
    sent = {"batches": 0, "busy": 0}
    done_at: list[float] = []

    def backlog():
        inflight = [handle.remote(images, uris) for _ in range(5)]
        while not stop.is_set() or inflight:
            out = inflight.pop(0).result()
            if isinstance(out, str):  # busy: back off as the job's callers do
                sent["busy"] += 1
                time.sleep(0.05)
            else:
                sent["batches"] += 1
                done_at.append(time.perf_counter())
            if not stop.is_set():
                inflight.append(handle.remote(images, uris))

    t = threading.Thread(target=backlog)
    t.start()
    try:
        time.sleep(settle_s)
        t_on = time.perf_counter()
        result = online()
        t_off = time.perf_counter()
    finally:
        stop.set()
        t.join()
    return result, sent, done_at, (t_on, t_off)


def test_online_requests_go_first_with_an_archive_backlog(pool):
    body = (DEFECTS / "images" / "test").iterdir().__next__().read_bytes()
    images, uris = _archive_images()
    handle = app_handle(APP).options(method_name="detect_archive")
    _online_latencies(pool, body, 3)  # warm
    idle, _ = _online_latencies(pool, body, 8)
    engine_batch_ms = _engine_batch_ms(handle, images, uris)
    (busy, timings), sent, done_at, (t_on, t_off) = _with_backlog(
        handle, images, uris, 2 * engine_batch_ms / 1e3 + 0.5, lambda: _online_latencies(pool, body, 8))
    assert sent["batches"] >= 4 and sent["busy"] > 0  # the replica really held a backlog
    assert all(t["archive_images"] == 0 for t in timings)  # CPU engine: archive_fill auto is off
    # One engine batch under this load: the time between two archive batches finishing while
    # the online requests ran (on 2 shared cores it is longer than on the idle replica).
    during = [b - a for a, b in zip(done_at, done_at[1:], strict=False) if t_on <= a and b <= t_off]
    batch_ms = statistics.median(during) * 1e3 if during else engine_batch_ms
    # Without priority an online request would wait behind the whole backlog (4 batches held,
    # i.e. >= 4 engine batches); with it, behind at most the one engine call running. (A
    # closed-loop client sends its next request just as the archive takes the engine back, so
    # it does wait about one batch.)
    limit = statistics.median(idle) + batch_ms + 100
    assert statistics.median(busy) <= limit, (statistics.median(idle), engine_batch_ms, batch_ms, busy)


def test_online_batches_run_beside_a_running_archive_call(pool):
    """archive_overlap on (a GPU's default): an online batch starts at once instead of waiting
    for the archive-only call that is running; its wait in the replica is the batch window, not
    an engine batch, and the archive batches still all complete."""
    from ray import serve

    from raydetect.serve.app import app_builder

    app = "poolbeside"
    serve.run(app_builder(serve_args(archive_overlap="on")), name=app, route_prefix="/beside")
    try:
        url = f"{pool}/beside"
        body = (DEFECTS / "images" / "test").iterdir().__next__().read_bytes()
        images, uris = _archive_images()
        handle = app_handle(app).options(method_name="detect_archive")
        _online_latencies(url, body, 3)  # warm
        engine_batch_ms = _engine_batch_ms(handle, images, uris)
        (_, timings), sent, _, _ = _with_backlog(
            handle, images, uris, 2 * engine_batch_ms / 1e3 + 0.5, lambda: _online_latencies(url, body, 8))
        assert sent["batches"] >= 4 and sent["busy"] > 0  # the replica really held a backlog
        queue = statistics.median(t["queue_ms"] for t in timings)
        # waiting for a running archive call would cost ~ an engine batch; beside it, the wait
        # is the batch window (10 ms) and the replica's event loop
        assert queue < 0.3 * engine_batch_ms, (queue, engine_batch_ms, timings)
    finally:
        serve.delete(app)


def _replica_name(app: str) -> str:
    return app_handle(app).options(method_name="archive_info").remote().result(timeout_s=120)["replica"]


def test_replica_killed_mid_job_leaves_one_row_per_input(pool, tmp_path):
    import ray
    from ray import serve

    from raydetect.serve.app import app_builder

    app = "poolkill"
    serve.run(app_builder(serve_args()), name=app, route_prefix="/kill")
    try:
        before = _replica_name(app)
        assert before
        inputs = tmp_path / "in"  # 60 inputs, 15 shards
        inputs.mkdir()
        sources = sorted((DEFECTS / "images" / "test").iterdir())[:20]
        for k in range(3):
            for p in sources:
                shutil.copy(p, inputs / f"{k}-{p.name}")
        out = tmp_path / "out"
        cfg = job_cfg(inputs, out, via_serve=app, rows_per_call=8, shard_size=4)
        killed = threading.Event()

        def killer():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not list(out.glob("part-*.parquet")):
                time.sleep(0.05)
            ray.kill(ray.get_actor(before, namespace="serve"), no_restart=True)
            killed.set()

        k = threading.Thread(target=killer)
        k.start()
        try:
            summary = run_job(cfg)
        except Exception:  # allowed: the re-run finishes the shards
            summary = None
        k.join()
        assert killed.is_set()
        if summary is None or len(list(out.glob("part-*.parquet"))) < 15:
            summary = run_job(cfg)
        table, rows = rows_of(out)
        uris = [r.uri for r in rows]
        expected = sorted(str(p) for p in inputs.iterdir())
        assert sorted(uris) == expected  # exactly one row per input: none lost, none repeated
        assert len(list(out.glob("part-*.parquet"))) == 15 and summary.images == 60
        assert _replica_name(app) != before  # Serve replaced the killed replica
    finally:
        serve.delete(app)
