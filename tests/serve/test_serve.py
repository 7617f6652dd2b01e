"""The online endpoint over real HTTP on 127.0.0.1 with a real Ray Serve instance.

One application (the trained defects model, an API key, small limits) serves every test in
this module; a second, short-lived one checks the request timeout.
"""

import asyncio
import os
import secrets
import shutil
import time

import cv2
import httpx
import numpy as np
import pytest

from raydetect.config import ConfigError, DetectorConfig, JobConfig
from raydetect.detector import Detector
from raydetect.types import Detection
from tests.conftest import DEFECTS, MODELS, free_port, photo_paths

MODEL = str(MODELS / "yolov8n-defects.onnx")
KEY_ENV = "RAYDETECT_TEST_SERVE_KEY"
# Set at import (collection), before any fixture starts Ray: replicas read the key from the
# environment they inherit from the Ray node, as they would on a real cluster.
os.environ.setdefault(KEY_ENV, "key-" + secrets.token_hex(16))
KEY = os.environ[KEY_ENV]
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 2_000_000
MAX_PIXELS = 1_000_000
CONTENT_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}


def defect_paths(n: int):
    return sorted((DEFECTS / "images" / "test").iterdir())[:n]


def sample_paths():
    """Real photos (JPEG, WebP) and defect images the trained model finds boxes in."""
    return photo_paths() + defect_paths(6)


def app_args(**extra):
    return {
        "model": MODEL,
        "api_key_env": KEY_ENV,
        "num_cpus": 0.5,
        "max_bytes": MAX_BYTES,
        "max_pixels": MAX_PIXELS,
        "max_batch_size": 8,
        "batch_wait_ms": 20,
        "max_files": 8,
        **extra,
    }


@pytest.fixture(scope="module")
def server(ray_local):
    from ray import serve

    from raydetect.serve.app import app_builder

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(app_builder(app_args()), name="rdtest", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        yield url
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def detector():
    """The same class and model in this process: the reference for the endpoint."""
    return Detector(DetectorConfig(model=MODEL, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS, batch_size=1))


def post_image(client, path, headers=AUTH, params=None):
    data = path.read_bytes()
    ctype = CONTENT_TYPES[path.suffix.lower()]
    return client.post("/v1/detect", content=data, headers={**headers, "Content-Type": ctype}, params=params)


def assert_same(got: list[dict], want: list[Detection], where: str):
    """Same boxes, classes and scores (float tolerance: a batch of 1 and a batch of many take
    different kernel paths in the engine)."""
    assert len(got) == len(want), f"{where}: {len(got)} detections, expected {len(want)}"
    for g, w in zip(got, want, strict=True):
        assert g["class_id"] == w.class_id and g["class_name"] == w.class_name, where
        assert g["score"] == pytest.approx(w.score, abs=1e-3), where
        for k in ("x1", "y1", "x2", "y2"):
            assert g[k] == pytest.approx(getattr(w, k), abs=0.05), f"{where}: {k}"


def assert_json_error(r, code: int, fragment: str):
    assert r.status_code == code, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert fragment in r.json()["detail"], r.text


# --- endpoints -----------------------------------------------------------------------------


def test_health_model_and_openapi(client, detector):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/v1/model").status_code == 401
    info = client.get("/v1/model", headers=AUTH).json()
    assert info["sha256"] == detector.card.sha256
    assert {int(k): v for k, v in info["names"].items()} == detector.names
    assert info["imgsz"] == [640, 640]
    assert (info["engine"], info["precision"], info["max_batch_size"]) == ("onnxruntime", "fp32", 8)
    assert info["engine_batch_size"] >= 8
    spec = client.get("/openapi.json").json()
    assert {"/healthz", "/v1/model", "/v1/detect", "/v1/detect/batch"} <= set(spec["paths"])
    body = spec["paths"]["/v1/detect"]["post"]["requestBody"]["content"]
    assert {"image/jpeg", "image/png", "multipart/form-data"} <= set(body)
    params = {p["name"] for p in spec["paths"]["/v1/detect"]["post"]["parameters"]}
    assert {"conf", "iou", "max_det"} <= params


def test_live_responses_match_the_openapi_schema(client):
    """The OpenAPI document describes what the endpoint really sends: live 200 responses of
    every route validate against their declared response models (JSON Schema 2020-12)."""
    from jsonschema import Draft202012Validator

    spec = client.get("/openapi.json").json()

    def check(route: str, method: str, body: dict) -> None:
        ref = spec["paths"][route][method]["responses"]["200"]["content"]["application/json"]["schema"]
        Draft202012Validator({**ref, "components": spec["components"]}).validate(body)

    good = sorted((DEFECTS / "images" / "test").iterdir())[0].read_bytes()
    check("/v1/model", "get", client.get("/v1/model", headers=AUTH).json())
    r = client.post("/v1/detect", content=good, headers={**AUTH, "Content-Type": "image/jpeg"}, params={"conf": 0.01})
    assert r.status_code == 200 and r.json()["detections"]
    check("/v1/detect", "post", r.json())
    files = [("files", ("a.jpg", good, "image/jpeg")), ("files", ("bad.jpg", b"not an image", "image/jpeg"))]
    r = client.post("/v1/detect/batch", files=files, headers=AUTH)
    assert [x["status"] for x in r.json()["results"]] == [200, 400]
    check("/v1/detect/batch", "post", r.json())
    with pytest.raises(Exception, match="required"):  # the check can fail: a body missing a field
        check("/v1/detect", "post", {k: v for k, v in r.json()["results"][0].items() if k != "uri"})


def listener_command(port: int) -> str | None:
    """The command name of the process listening on 127.0.0.1:``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return open(f"/proc/{pid}/comm").read().strip()
        except OSError:
            continue
    return None


def test_requests_go_through_haproxy_to_the_replica(server):
    """The session's Ray runs Serve's high-throughput ingress (as ``raydetect serve`` does by
    default): HAProxy owns the HTTP port, not a Python proxy actor."""
    if not os.path.exists("/proc/net/tcp"):
        pytest.skip("needs Linux /proc to find the listening process")
    port = int(server.rsplit(":", 1)[1])
    assert listener_command(port) == "haproxy"


def test_responses_equal_the_batch_job_and_the_detector(server, client, detector, tmp_path):
    from raydetect.job.run import run_job
    from raydetect.types import table_to_results

    paths = sample_paths()
    for p in paths:
        shutil.copy(p, tmp_path / p.name)
    cfg = JobConfig(
        input=str(tmp_path),
        output=str(tmp_path / "out"),
        detector=DetectorConfig(model=MODEL, max_pixels=MAX_PIXELS),
        num_cpus=0.5,  # the replica holds 0.5 of the 2 CPUs: the job's actors fit beside it
        progress=False,
    )
    summary = run_job(cfg)
    assert summary.images == len(paths) and summary.errors == 0
    import pyarrow.parquet as pq

    job = {os.path.basename(r.uri): r for r in table_to_results(pq.read_table(tmp_path / "out"))}
    total = 0
    for p in paths:
        r = post_image(client, p)
        assert r.status_code == 200, r.text
        body = r.json()
        ref = job[p.name]
        assert (body["width"], body["height"], body["error"]) == (ref.width, ref.height, None)
        assert_same(body["detections"], ref.detections, f"{p.name} vs batch job")
        assert_same(body["detections"], detector.detect([p.read_bytes()])[0].detections, p.name)
        assert body["model"]["sha256"] == detector.card.sha256
        assert body["model"]["engine"] == "onnxruntime"
        t = body["timings"]
        assert t["batch_size"] >= 1 and t["total_ms"] >= t["inference_ms"] > 0
        assert {"queue_ms", "decode_ms", "preprocess_ms", "postprocess_ms"} <= set(t)
        total += len(body["detections"])
    assert total >= 6  # the trained model finds the defects: the comparison is not vacuous

    # multipart upload of a PNG gives the same answer as the raw JPEG it came from
    p = defect_paths(1)[0]
    png = cv2.imencode(".png", cv2.imread(str(p)))[1].tobytes()
    r = client.post("/v1/detect", files={"file": ("a.png", png, "image/png")}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["uri"] == "a.png"
    assert_same(r.json()["detections"], job[p.name].detections, "multipart PNG")


def test_batch_route_and_per_request_parameters(client, detector):
    paths = defect_paths(3)
    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
    r = client.post("/v1/detect/batch", files=files, headers=AUTH, params={"conf": 0.1})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["uri"] for x in results] == [p.name for p in paths]
    refs = detector.detect([p.read_bytes() for p in paths], conf=0.1)
    for x, ref in zip(results, refs, strict=True):
        assert x["status"] == 200
        assert_same(x["detections"], ref.detections, x["uri"])
    assert max(x["timings"]["batch_size"] for x in results) > 1  # one request, one engine call

    # concurrent requests with different conf/max_det share engine calls, each keeps its own
    img = photo_paths()[0]
    variants = [{"conf": 0.01}, {"conf": 0.3}, {"conf": 0.01, "max_det": 2}, {"iou": 0.3, "conf": 0.01}] * 3

    async def fire():
        async with httpx.AsyncClient(base_url=str(client.base_url), timeout=120) as ac:
            return await asyncio.gather(*(
                ac.post("/v1/detect", content=img.read_bytes(), params=v,
                        headers={**AUTH, "Content-Type": "image/jpeg"})
                for v in variants
            ))

    responses = asyncio.run(fire())
    assert max(r.json()["timings"]["batch_size"] for r in responses) > 1
    counts = set()
    for v, r in zip(variants, responses, strict=True):
        assert r.status_code == 200, r.text
        want = detector.detect([img.read_bytes()], **v)[0].detections
        assert_same(r.json()["detections"], want, str(v))
        counts.add(len(want))
    assert len(counts) > 1  # the parameters really change the answer


def test_bad_input_matrix_and_the_replica_keeps_serving(client):
    good = defect_paths(1)[0].read_bytes()
    photo = photo_paths()[0].read_bytes()
    jpeg = {**AUTH, "Content-Type": "image/jpeg"}
    huge = cv2.imencode(".png", np.full((1000, 1200, 3), 80, np.uint8))[1].tobytes()  # 1.2 MP
    assert len(huge) < MAX_BYTES

    def post(**kw):
        return client.post("/v1/detect", **kw)

    cases = [
        ("empty", post(content=b"", headers=jpeg), 400, "empty file"),
        ("garbage", post(content=os.urandom(5000), headers=jpeg), 400, "cannot decode"),
        ("truncated", post(content=photo[: len(photo) // 2], headers=jpeg), 400, "truncated JPEG"),
        ("too many bytes", post(content=b"\xff" * (MAX_BYTES + 1), headers=jpeg), 413, "exceeds the limit"),
        ("too many bytes, chunked", post(content=iter([b"\xff" * 700_000] * 3), headers=jpeg), 413,
         "exceeds the limit"),
        ("too many pixels", post(content=huge, headers={**AUTH, "Content-Type": "image/png"}), 413,
         "max_pixels 1000000"),
        ("text/plain", post(content=b"hello", headers={**AUTH, "Content-Type": "text/plain"}), 415,
         "unsupported content type 'text/plain'"),
        ("no content type", post(content=good, headers=AUTH), 415, "unsupported content type"),
        ("no key", post(content=good, headers={"Content-Type": "image/jpeg"}), 401, "missing API key"),
        ("wrong bearer", post(content=good, headers={"Authorization": "Bearer nope", "Content-Type": "image/jpeg"}),
         401, "invalid API key"),
        ("wrong x-api-key", post(content=good, headers={"X-API-Key": KEY + "x", "Content-Type": "image/jpeg"}),
         401, "invalid API key"),
        ("multipart without 'file'", post(files={"image": ("a.jpg", good, "image/jpeg")}, headers=AUTH), 400,
         "field 'file'"),
        ("multipart text part", post(files={"file": ("a.txt", b"hi", "text/plain")}, headers=AUTH), 415,
         "'text/plain'"),
        ("multipart garbage", post(content=b"--x\r\ngarbage", headers={**AUTH, "Content-Type":
                                   "multipart/form-data; boundary=zz"}), 400, "multipart"),
        ("batch route, raw body", client.post("/v1/detect/batch", content=good, headers=jpeg), 415, "multipart"),
        ("batch route, too many files", client.post(
            "/v1/detect/batch", files=[("files", (f"{i}.jpg", good, "image/jpeg")) for i in range(9)],
            headers=AUTH), 413, "too many files"),
    ]
    for name, r, code, fragment in cases:
        assert r.status_code == code, (name, r.status_code, r.text)
        assert_json_error(r, code, fragment)

    for params in ({"conf": 2}, {"conf": -0.1}, {"iou": 1.5}, {"max_det": 0}, {"conf": "high"}):
        r = post(content=good, headers=jpeg, params=params)
        assert r.status_code == 422, (params, r.text)

    # the batch route reports each file on its own; the good one is still answered
    r = client.post(
        "/v1/detect/batch",
        files=[("files", ("good.jpg", good, "image/jpeg")), ("files", ("bad.jpg", b"nope", "image/jpeg")),
               ("files", ("big.png", huge, "image/png")), ("files", ("a.txt", b"hi", "text/plain"))],
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    assert [x["status"] for x in r.json()["results"]] == [200, 400, 413, 415]
    assert r.json()["results"][0]["detections"]

    # after all that, the same replica still answers good requests
    for headers in (AUTH, {"X-API-Key": KEY}):
        r = post(content=good, headers={**headers, "Content-Type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["detections"], r.text


def test_16_clients_x_50_requests_batch_and_show_in_ray_metrics(ray_local, server):
    images = [p.read_bytes() for p in defect_paths(16)]

    async def one_client(ac, i):
        out = []
        for j in range(50):
            r = await ac.post("/v1/detect", content=images[(i + j) % len(images)],
                              headers={**AUTH, "Content-Type": "image/jpeg"})
            out.append((r.status_code, r.json()["timings"]["batch_size"] if r.status_code == 200 else r.text))
        return out

    async def load():
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=server, timeout=300, limits=limits) as ac:
            return await asyncio.gather(*(one_client(ac, i) for i in range(16)))

    t0 = time.perf_counter()
    done = [x for per_client in asyncio.run(load()) for x in per_client]
    seconds = time.perf_counter() - t0
    errors = [x for x in done if x[0] != 200]
    assert len(done) == 800 and not errors, errors[:5]
    sizes = [x[1] for x in done]
    assert max(sizes) > 1, "dynamic batching never merged requests"
    print(f"\n800 requests in {seconds:.1f} s ({800 / seconds:.1f} req/s), "
          f"mean batch {np.mean(sizes):.2f}, max {max(sizes)}")

    # one error of each kind, to be counted by code
    jpeg = {**AUTH, "Content-Type": "image/jpeg"}
    for kw, code in [(dict(content=b"junk", headers=jpeg), 400), (dict(content=images[0]), 401),
                     (dict(content=b"\0" * (MAX_BYTES + 1), headers=jpeg), 413),
                     (dict(content=b"hi", headers={**AUTH, "Content-Type": "text/plain"}), 415),
                     (dict(content=images[0], headers=jpeg, params={"conf": 2}), 422)]:
        assert httpx.post(server + "/v1/detect", timeout=60, **kw).status_code == code

    # The same, read back from Ray's Prometheus endpoint (exported every few seconds).
    from prometheus_client.parser import text_string_to_metric_families

    port = ray_local._private.worker.global_worker.node.metrics_export_port
    deadline = time.monotonic() + 90
    while True:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name.startswith("ray_raydetect_") and s.labels.get("app") == "rdtest"]
        ok = sum(s.value for s in samples if s.name == "ray_raydetect_requests_total"
                 and s.labels["route"] == "/v1/detect" and s.labels["code"] == "200")
        batches = sum(s.value for s in samples if s.name == "ray_raydetect_batch_size_count")
        singles = sum(s.value for s in samples if s.name == "ray_raydetect_batch_size_bucket"
                      and s.labels["le"] == "1.0")
        errs = {s.labels["code"] for s in samples if s.name == "ray_raydetect_errors_total" and s.value > 0}
        latency = sum(s.value for s in samples if s.name == "ray_raydetect_request_latency_ms_count")
        if (ok >= 800 and {"400", "401", "413", "415", "422"} <= errs) or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert ok >= 800, f"requests_total{{route=/v1/detect,code=200}} = {ok}"
    assert batches - singles > 0, "the batch-size histogram shows no batch > 1"
    assert batches < ok  # requests were merged: fewer engine calls than requests
    assert latency >= ok
    assert {"400", "401", "413", "415", "422"} <= errs


def test_request_timeout_gives_504(server, client):
    from ray import serve

    from raydetect.serve.app import app_builder

    # a batch that waits 3 s to fill cannot answer within 0.2 s
    slow = app_args(name="rdslow", route_prefix="/slow", timeout_s=0.2, batch_wait_ms=3000)
    serve.run(app_builder(slow), name="rdslow", route_prefix="/slow")
    try:
        good = defect_paths(1)[0].read_bytes()
        r = client.post("/slow/v1/detect", content=good, headers={**AUTH, "Content-Type": "image/jpeg"})
        assert_json_error(r, 504, "timeout_s 0.2")
    finally:
        serve.delete("rdslow")
    r = client.post("/v1/detect", content=good, headers={**AUTH, "Content-Type": "image/jpeg"})
    assert r.status_code == 200


# --- configuration (no Ray needed) -------------------------------------------------------------


def test_serve_config_errors_name_the_field():
    from raydetect.serve.app import serve_config_from_args

    with pytest.raises(ConfigError, match="min_replicas .3. must not exceed max_replicas .2."):
        serve_config_from_args({"model": MODEL, "replicas": "3:2"})
    with pytest.raises(ConfigError, match=r"serve\.num_gpus"):
        serve_config_from_args({"model": MODEL, "num_gpus": "-0.5"})
    with pytest.raises(ConfigError, match=r"serve\.detector\.conf"):
        serve_config_from_args({"model": MODEL, "conf": 3})
    with pytest.raises(ConfigError, match=r"serve\.replicas"):
        serve_config_from_args({"model": MODEL, "replicas": "two"})
    with pytest.raises(ConfigError, match=r"serve\.api_key_env"):
        serve_config_from_args({"model": MODEL, "api_key_env": "not a name"})
    with pytest.raises(ConfigError, match="max_ongoing_requests"):
        serve_config_from_args({"model": MODEL, "max_batch_size": 32, "max_ongoing_requests": 16})
    with pytest.raises(ConfigError, match=r"serve\.bogus"):
        serve_config_from_args({"model": MODEL, "bogus": 1})
    from raydetect.serve.http import read_api_key

    os.environ.pop("RAYDETECT_TEST_UNSET_KEY", None)
    with pytest.raises(ConfigError, match="RAYDETECT_TEST_UNSET_KEY is not set"):
        read_api_key("RAYDETECT_TEST_UNSET_KEY")


def test_builder_args_and_deployment_options():
    from raydetect.serve.app import deployment_options, serve_config_from_args

    # strings as `serve run ... key=value` passes them; detector fields flat or nested
    cfg = serve_config_from_args({"model": MODEL, "replicas": "1:4", "num_gpus": "0.5", "conf": "0.4",
                                  "batch_wait_ms": "2", "max_batch_size": "32"})
    assert (cfg.min_replicas, cfg.max_replicas, cfg.num_gpus) == (1, 4, 0.5)
    assert (cfg.detector.conf, cfg.batch_wait_timeout_s, cfg.max_batch_size) == (0.4, 0.002, 32)
    opts = deployment_options(cfg)
    auto = opts["autoscaling_config"]
    assert {k: auto[k] for k in ("min_replicas", "max_replicas", "target_ongoing_requests")} == {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16.0}
    assert auto["policy"]["policy_kwargs"] == {"target": 16.0, "archive_max_replicas": 4}
    assert opts["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    assert "num_replicas" not in opts
    fixed = deployment_options(serve_config_from_args({"detector": {"model": MODEL}, "replicas": 2}))
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    rel = serve_config_from_args({"model": "../shared/data/models/x.onnx"})
    assert os.path.isabs(rel.detector.model)


def test_checked_in_serve_config_is_valid():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from raydetect.serve.app import serve_config_from_args
    from tests.conftest import REPO

    doc = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    (app,) = schema.applications
    assert app.import_path == "raydetect.serve:app_builder"
    cfg = serve_config_from_args(app.args)
    assert cfg.detector.model.endswith("yolov8n-defects.onnx")
    assert doc["http_options"]["host"] == "127.0.0.1"


def test_cli_builds_the_same_config():
    from raydetect.cli import build_parser
    from raydetect.cli.serve import serve_config

    args = build_parser().parse_args(
        ["serve", "--model", MODEL, "--replicas", "2:3", "--num-gpus", "0.25", "--max-batch-size", "4",
         "--batch-wait-ms", "10", "--api-key-env", KEY_ENV, "--max-bytes", "1000", "--max-pixels", "500",
         "--timeout-s", "5", "--port", "8123"]
    )
    cfg = serve_config(args)
    assert (cfg.min_replicas, cfg.max_replicas, cfg.num_gpus, cfg.max_batch_size) == (2, 3, 0.25, 4)
    assert (cfg.batch_wait_timeout_s, cfg.api_key_env, cfg.timeout_s, cfg.port) == (0.01, KEY_ENV, 5.0, 8123)
    assert (cfg.detector.max_bytes, cfg.detector.max_pixels, cfg.host) == (1000, 500, "127.0.0.1")
    bad = build_parser().parse_args(["serve", "--model", MODEL, "--port", "0"])
    with pytest.raises(ConfigError, match=r"serve\.port"):
        serve_config(bad)
