"""Ray's start-up noise stays out of ``raydetect detect``'s default output (stdout is not a
terminal here, the case where Ray Data logs instead of drawing bars); ``-v`` brings it back."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import IMAGES, MODELS, REPO

MODEL = str(MODELS / "yolov5n-coco.onnx")

#: lines Ray prints by default when a driver starts a local instance and runs a Dataset
NOISE = (
    "Starting execution of Dataset",  # Ray Data INFO
    "Execution plan of Dataset",  # Ray Data INFO
    "Progress will be logged because stdout is a non-interactive terminal",  # Ray Data INFO
    "logging_progress.py",  # Ray Data's periodic operator tables
    "Token authentication is enabled",  # ray WARNING at start-up
    "core_worker.cc",  # the driver's C++ core worker (ERROR about actor constructor args)
    "RAY_BACKEND_LOG_LEVEL",
)


def _detect(tmp_path, name: str, *flags: str) -> subprocess.CompletedProcess:
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for f in ("bus.jpg", "cup.jpg"):
        if not (photos / f).exists():
            os.symlink(IMAGES / f, photos / f)
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray instance, as a user's first run
    env.pop("RAY_BACKEND_LOG_LEVEL", None)
    return subprocess.run(
        [sys.executable, "-m", "raydetect.cli", *flags, "detect", "--model", MODEL, "--input", str(photos),
         "--output", str(tmp_path / name), "--no-report"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


def test_detect_default_output_has_no_ray_noise_and_v_brings_it_back(tmp_path):
    quiet = _detect(tmp_path, "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    out = quiet.stdout + quiet.stderr
    assert "raydetect: 2 images in" in quiet.stdout and "0 errors" in quiet.stdout
    for line in NOISE:
        assert line not in out, f"{line!r} in the default output:\n{out}"
    # what is left: raydetect's own lines (the shard count, progress in logs, the summary)
    lines = [x for x in out.splitlines() if x.strip()]
    assert all("raydetect" in x or x.startswith("detect: ") for x in lines), out
    assert any(x.startswith("detect: 2/2 images in") for x in lines), out  # progress line for logs

    loud = _detect(tmp_path, "loud", "-v")
    assert loud.returncode == 0, loud.stderr[-3000:]
    out_v = loud.stdout + loud.stderr
    assert "raydetect: 2 images in" in loud.stdout
    for line in ("Starting execution of Dataset", "Execution plan of Dataset"):
        assert line in out_v, f"{line!r} missing with -v:\n{out_v[-3000:]}"
    assert len(out_v.splitlines()) > len(lines) + 5
