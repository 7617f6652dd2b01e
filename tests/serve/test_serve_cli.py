"""`raydetect serve` as a user runs it: a subprocess that starts its own Ray, serves on
127.0.0.1 until Ctrl-C (SIGINT) or SIGTERM, then stops cleanly (exit 0, no stack dump). It runs the classic Python proxy
(``--ingress proxy``); tests/serve/test_serve.py covers the default HAProxy ingress."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import DEFECTS, MODELS, REPO, free_port


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_raydetect_serve_until_ctrl_c(tmp_path, sig):
    port = free_port()
    env = {
        **os.environ,
        "RAY_ADDRESS": "local",  # its own Ray instance, never a cluster another process runs
        "RAYDETECT_CLI_TEST_KEY": "cli-test-key",
    }
    log = open(tmp_path / "serve.log", "w+")
    cmd = [sys.executable, "-m", "raydetect.cli", "serve", "--model", str(MODELS / "yolov8n-defects.onnx"),
           "--port", str(port), "--num-cpus", "0.5", "--api-key-env", "RAYDETECT_CLI_TEST_KEY",
           "--max-batch-size", "4", "--batch-wait-ms", "2", "--ingress", "proxy"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, "raydetect serve exited early:\n" + (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not serving after 240 s:\n" + (tmp_path / "serve.log").read_text()
            time.sleep(1)
        image = sorted((DEFECTS / "images" / "test").iterdir())[0].read_bytes()
        r = httpx.post(url + "/v1/detect", content=image, timeout=120,
                       headers={"X-API-Key": "cli-test-key", "Content-Type": "image/jpeg"})
        assert r.status_code == 200 and r.json()["detections"], r.text
        assert httpx.post(url + "/v1/detect", content=image, timeout=60,
                          headers={"Content-Type": "image/jpeg"}).status_code == 401

        # serve.run returns (and the ready line is printed) a moment after the replica answers
        deadline = time.monotonic() + 60
        while "Ctrl-C stops" not in (tmp_path / "serve.log").read_text():
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == 0, (tmp_path / "serve.log").read_text()
        text = (tmp_path / "serve.log").read_text()
        assert "raydetect serve: stopping" in text and "ingress proxy" in text, text
        assert "Traceback" not in text, text
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/healthz", timeout=5)
    finally:
        if proc.poll() is None:  # only on failure: stop what this test started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_raydetect_serve_refuses_a_missing_key_variable():
    env = {k: v for k, v in os.environ.items() if k != "RAYDETECT_CLI_UNSET"}
    r = subprocess.run(
        [sys.executable, "-m", "raydetect.cli", "serve", "--model", str(MODELS / "yolov8n-defects.onnx"),
         "--api-key-env", "RAYDETECT_CLI_UNSET"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2
    assert "serve.api_key_env: environment variable RAYDETECT_CLI_UNSET is not set" in r.stderr
