"""Running raydetect like a service: a real `ray start --head` cluster on this machine, `ray job
submit` of jobs/detect.py against a local S3 server, Ray metrics from the detector actors, and
exactly-once output after detector actors and then the driver are killed mid-job.

The cluster is started in its own session and temp dir, and stopped by signalling that session's
processes (not `ray stop`, which would stop every Ray instance on the machine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import MODELS, REPO, S3_KEY, S3_SECRET, free_port, photo_paths
from tests.local_cluster import session_pids, start_head, stop_session

MODEL = MODELS / "yolov8n-random.onnx"
AUTH_ENV = {"RAY_AUTH_MODE": "token"}  # Ray 2.5x: the job/state APIs need it (stack-facts)

pytestmark = pytest.mark.timeout(900)


@dataclass
class Head:
    gcs: str  # host:port for RAY_ADDRESS
    api: str  # http://127.0.0.1:<dashboard port> for `ray job submit` and the state API
    metrics: str  # http://127.0.0.1:<metrics port>/metrics
    proc: subprocess.Popen
    log: Path

    def env(self, **extra) -> dict[str, str]:
        return {**os.environ, **AUTH_ENV, **extra}


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="rdsvc", dir="/tmp")  # short: Ray's socket paths are limited
    gcs, dash, metrics = free_port(), free_port(), free_port()
    log = Path(temp) / "ray-start.log"
    cmd = [
        f"--port={gcs}", "--num-cpus=2", "--num-gpus=0",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
        f"--metrics-export-port={metrics}", f"--temp-dir={temp}", "--disable-usage-stats",
    ]
    env = {**os.environ, **AUTH_ENV, "RAY_metrics_report_interval_ms": "2000"}
    proc = start_head(cmd, env=env, log=log)
    head = Head(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{metrics}/metrics", proc, log)
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            ready = subprocess.run(["ray", "job", "list", "--address", head.api], env=head.env(),
                                   capture_output=True, text=True, timeout=60)
            if ready.returncode == 0:
                break
            if time.time() > deadline:
                pytest.fail(f"the job server did not come up: {ready.stderr[-2000:]}")
            time.sleep(2)
        yield head
    finally:
        stop_session(proc.pid, grace_s=5)
        proc.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def read_parts(fs, out_path):
    """All rows of the image part files, as (uris, table list)."""
    from raydetect.job import output as sh

    uris = []
    for p in sh.existing_parts(fs, out_path).values():
        with fs.open(p, "rb") as f:
            uris += pq.read_table(f, columns=["uri"]).column("uri").to_pylist()
    return uris


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str, job: str) -> float | None:
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") and f'job="{job}"' in line:
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total


def submit(cmd: list[str], head: Head) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting (it answers
    "No available agent to submit job, please try again later") and, a few times, when the
    dashboard drops the working-dir upload (CI once got "Remote end closed connection without
    response" there on a loaded 2-core machine)."""
    dropped = 0
    for _ in range(20):
        proc = subprocess.run(cmd, cwd=REPO, env=head.env(), capture_output=True, text=True, timeout=600)
        text = proc.stdout + proc.stderr
        if proc.returncode == 0:
            return proc
        if "Connection aborted" in text or "RemoteDisconnected" in text:
            dropped += 1
            if dropped > 3:
                return proc
        elif "No available agent" not in text:
            return proc
        time.sleep(3)
    return proc


def test_ray_job_submit_against_s3(ray_head, s3_server, s3fs_client, tmp_path):
    bucket = "svc"
    if not s3fs_client.exists(bucket):
        s3fs_client.mkdir(bucket)
    s3fs_client.put(str(MODEL), f"{bucket}/models/m.onnx")
    for p in photo_paths():
        s3fs_client.put(str(p), f"{bucket}/in/{p.name}")
    s3fs_client.pipe(f"{bucket}/in/broken.jpg", b"not a jpeg")
    inputs = sorted(f"s3://{bucket}/in/{p.name}" for p in photo_paths()) + [f"s3://{bucket}/in/broken.jpg"]
    inputs.sort()

    # the README's runtime env, plus what this local S3 server needs
    renv = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
    renv["env_vars"].update(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET,
                            RAYDETECT_S3_ENDPOINT_URL=s3_server)
    renv_file = tmp_path / "runtime_env.yaml"
    renv_file.write_text(yaml.safe_dump(renv))
    output = f"s3://{bucket}/out/run1"
    cmd = [
        "ray", "job", "submit", "--address", ray_head.api, "--working-dir", str(REPO),
        "--runtime-env", str(renv_file), "--",
        "python", "jobs/detect.py", "--model", f"s3://{bucket}/models/m.onnx", "--input", f"s3://{bucket}/in",
        "--output", output, "--conf", "0.0001", "--batch-size", "4", "--shard-size", "3",
        "--engine", "onnxruntime", "--threads", "1", "--no-progress",
    ]
    proc = submit(cmd, ray_head)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert re.search(rf"raydetect: {len(inputs)} images in .* 1 errors -> {output}", proc.stdout), proc.stdout[-3000:]
    assert "succeeded" in proc.stdout

    uris = read_parts(s3fs_client, f"{bucket}/out/run1")
    assert sorted(uris) == inputs  # each input exactly once
    assert len(s3fs_client.glob(f"{bucket}/out/run1/part-*.parquet")) == 3  # 8 inputs, 3 per shard
    manifest = json.loads(s3fs_client.cat(f"{bucket}/out/run1/_job.json"))
    assert manifest["shard_size"] == 3 and manifest["settings"]["conf"] == 0.0001
    assert manifest["model_sha256"] == __import__("hashlib").sha256(MODEL.read_bytes()).hexdigest()
    report = json.loads(s3fs_client.cat(f"{bucket}/out/run1/_report/report.json"))
    assert report["images"] == len(inputs) and report["errors"] == 1
    assert sum(report["per_class"].values()) == report["detections"] > 0
    assert report["error_examples"][0]["uri"] == f"s3://{bucket}/in/broken.jpg"
    assert s3fs_client.exists(f"{bucket}/out/run1/_report/throughput.png")
    assert len(s3fs_client.glob(f"{bucket}/out/run1/_report/samples/*.jpg")) == 4

    # the detector actors' counters reach the node's Prometheus endpoint
    deadline, images = time.time() + 60, None
    while time.time() < deadline:
        images = metric_value(scrape(ray_head.metrics), "ray_raydetect_job_images_total", output)
        if images == len(inputs):
            break
        time.sleep(2)
    text = scrape(ray_head.metrics)
    assert images == len(inputs), [ln for ln in text.splitlines() if "raydetect" in ln][:20]
    assert metric_value(text, "ray_raydetect_job_errors_total", output) == 1
    assert metric_value(text, "ray_raydetect_job_detections_total", output) == report["detections"]
    assert metric_value(text, "ray_raydetect_job_batch_latency_s_count", output) >= 2

    # submitting the same job again resumes: every shard is done, nothing is rewritten
    before = {p: s3fs_client.info(p)["LastModified"] for p in s3fs_client.glob(f"{bucket}/out/run1/part-*")}
    proc = submit(cmd, ray_head)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resumed: 3 of 3 shards were done already, 0 images run now" in proc.stdout
    after = {p: s3fs_client.info(p)["LastModified"] for p in s3fs_client.glob(f"{bucket}/out/run1/part-*")}
    assert after == before


def _detector_actor_pids(head: Head) -> list[int]:
    """Worker pids of the detector actors (state API, which may lag: an actor already working
    can still read PENDING_CREATION), limited to processes of this test's cluster."""
    code = (
        "import json; from ray.util.state import list_actors; "
        f"a = list_actors(address={head.api!r}, detail=True, limit=1000); "
        "print(json.dumps([x.pid for x in a if 'MeteredDetector' in (x.class_name or '') "
        "and x.state != 'DEAD' and x.pid]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=head.env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    mine = set(session_pids(head.proc.pid))
    return [p for p in json.loads(out.stdout.strip().splitlines()[-1]) if p in mine]


def _wait_for(cond, timeout_s: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        if proc is not None and proc.poll() is not None:
            return None
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}")


def test_killed_actors_and_driver_then_rerun_gives_exactly_one_row_per_input(ray_head, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    photos = photo_paths()
    for k in range(15):  # 105 real photos under distinct names
        for p in photos:
            shutil.copy(p, src / f"{k}-{p.name}")
    (src / "z-broken.jpg").write_bytes(b"\xff\xd8 truncated")
    inputs = sorted(str(p) for p in src.iterdir())
    out = tmp_path / "out"
    n_shards = -(-len(inputs) // 5)
    cmd = [
        sys.executable, "jobs/detect.py", "--model", str(MODEL), "--input", str(src), "--output", str(out),
        "--conf", "0.0001", "--batch-size", "1", "--shard-size", "5", "--concurrency", "1",
        "--engine", "onnxruntime", "--threads", "1", "--no-progress", "--no-report",
    ]
    env = ray_head.env(RAY_ADDRESS=ray_head.gcs)
    log = open(tmp_path / "driver1.log", "w")
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        parts = lambda: sorted(out.glob("part-*.parquet"))  # noqa: E731
        _wait_for(lambda: len(parts()) >= 1, 300, "the first part file", driver)
        assert driver.poll() is None, (tmp_path / "driver1.log").read_text()[-3000:]
        pids = _wait_for(lambda: _detector_actor_pids(ray_head), 60, "the detector actors' pids", driver)
        assert pids and driver.poll() is None, "the job ended before its actors could be killed"
        for pid in pids:  # the detector actors crash mid-job
            os.kill(pid, signal.SIGKILL)
        n_killed_at = len(parts())
        # Ray restarts the actors and retries their batches; the job goes on writing shards...
        _wait_for(lambda: len(parts()) > n_killed_at, 300, "a part file after the actors were killed", driver)
        # ...until the driver itself is killed
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        log.close()
    first = {p.name: p.stat().st_mtime_ns for p in parts()}
    assert 0 < len(first), (tmp_path / "driver1.log").read_text()[-3000:]

    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"raydetect: {len(inputs)} images in" in rerun.stdout and "1 errors" in rerun.stdout
    assert len(first) < n_shards, "the job ended before the driver was killed: nothing to resume"
    assert f"resumed: {len(first)} of {n_shards} shards were done already" in rerun.stdout, rerun.stdout
    fs_uris = []
    for p in parts():
        fs_uris += pq.read_table(p, columns=["uri"]).column("uri").to_pylist()
    assert sorted(fs_uris) == inputs  # exactly one row per input: none lost, none twice
    assert len(parts()) == n_shards
    assert {p.name: p.stat().st_mtime_ns for p in parts() if p.name in first} == first  # done shards untouched
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
