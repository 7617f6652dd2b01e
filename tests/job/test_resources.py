"""Fail fast: a job asking for more than the cluster has stops after a bounded wait, naming what
was asked and what exists (real local Ray, CPU only); relative paths with `ray job submit`."""

import os
import subprocess
import sys
import time

import pytest

from raydetect.resources import InsufficientResourcesError, wait_for_actor_resources
from tests.conftest import IMAGES, MODELS, REPO


def test_gpu_actor_on_cpu_only_ray_stops_within_the_wait(ray_local):
    t0 = time.monotonic()
    with pytest.raises(InsufficientResourcesError) as e:
        wait_for_actor_resources(1.0, 1.0, 1, wait_s=3.0, may_grow=True, poll_s=0.5)
    took = time.monotonic() - t0
    assert 3.0 <= took < 8.0, took
    msg = str(e.value)
    assert "asks for 1 detector actor(s) of 1 CPU and 1 GPU each, but the cluster has room for 0" in msg
    assert "0 GPUs in all" in msg and "waited 3 s for an autoscaler" in msg and "--num-gpus 0" in msg
    # more CPUs per actor than any node has, and more actors than fit
    with pytest.raises(InsufficientResourcesError, match="of 64 CPU and 0 GPU each"):
        wait_for_actor_resources(64.0, 0.0, 1, wait_s=0.0, may_grow=True)
    with pytest.raises(InsufficientResourcesError, match="asks for 9 detector actor"):
        wait_for_actor_resources(1.0, 0.0, 9, wait_s=0.0)
    wait_for_actor_resources(1.0, 0.0, 1, wait_s=0.0)  # fits: returns at once


def test_cli_detect_with_a_gpu_on_a_cpu_only_machine_fails_fast(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "local"}
    cmd = [sys.executable, "-m", "raydetect.cli", "detect", "--model", str(MODELS / "yolov5n-coco.onnx"),
           "--input", str(IMAGES), "--output", str(tmp_path / "out"), "--num-gpus", "1",
           "--engine", "onnxruntime", "--resource-wait-s", "5"]
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stdout + r.stderr
    assert "raydetect detect: error: the job asks for 1 detector actor(s) of 1 CPU and 1 GPU each" in r.stderr
    assert "cannot add nodes" in r.stderr and "Traceback" not in r.stderr
    assert took < 120, took  # Ray's start-up, not a hang


@pytest.mark.parametrize("flag", ["--input", "--output", "--model"])
def test_submitted_job_refuses_relative_local_paths(tmp_path, flag):
    args = {"--model": "s3://models/m.onnx", "--input": "s3://in/", "--output": "s3://out/run"}
    args[flag] = "../shared/data/x"
    cmd = [sys.executable, "jobs/detect.py", *[a for kv in args.items() for a in kv]]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"{flag} ../shared/data/x is a relative local path: paths resolve on the cluster" in r.stderr
