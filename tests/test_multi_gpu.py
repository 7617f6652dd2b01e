"""benchmarks/multi_gpu.py --smoke (issue 19): the multi-GPU scaling benchmark's code path on the
CPU, with 2 fake GPUs (Ray resources only, the onnxruntime engine), in a subprocess: the job on
1 and 2 fake GPUs (2 actors x 0.5 GPU each) and the Serve point with replicas over them."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO


def test_multi_gpu_smoke_runs_every_count_and_writes_the_summary(data_dir, tmp_path):
    out = tmp_path / "multi_gpu_cpu_smoke"
    cmd = [sys.executable, str(REPO / "benchmarks" / "multi_gpu.py"), "--smoke", "--out", str(out),
           "--work", str(tmp_path / "work")]
    t0 = time.monotonic()
    # its own session: on a timeout its Ray processes go with it
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "RAYDETECT_TEST_DATA": str(data_dir)})
    try:
        log, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail("multi_gpu.py --smoke ran past 420 s:\n" + log[-4000:])
    wall = time.monotonic() - t0
    assert proc.returncode == 0, log[-4000:]

    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["smoke"] and doc["errors"] == {}, doc["errors"]
    s = doc["summary"]
    assert s["gpus"] == [1, 2]
    for key in ("img_s", "efficiency", "speedup", "serve_rps", "serve_efficiency", "gpu_busy"):
        assert set(s[key]) == {"1", "2"}, key
    assert all(v > 0 for v in s["img_s"].values())
    assert s["efficiency"]["1"] == s["speedup"]["1"] == 1.0
    assert s["efficiency"]["2"] == pytest.approx(s["img_s"]["2"] / (2 * s["img_s"]["1"]), rel=2e-3)
    assert s["serve_efficiency"]["2"] == pytest.approx(s["serve_rps"]["2"] / (2 * s["serve_rps"]["1"]), rel=2e-3)
    assert "meaningless" in s["note"] and s["stops_scaling"]

    jobs = [c["job"] for c in doc["counts"]]
    files = doc["args"]["files_per_gpu"]
    assert [j["images"] for j in jobs] == [files, 2 * files]
    assert [j["errors"] for j in jobs] == [0, 0]
    assert [j["actors"] for j in jobs] == [2, 4] and {j["gpus_per_actor"] for j in jobs} == {0.5}
    assert all(j["listing_s"] > 0 and j["write_s"] >= 0 and "spilled_mib" in j["object_store"] for j in jobs)
    assert all(any(ln.startswith("Operator") for ln in j["ray_data"]["lines"]) for j in jobs)
    assert [c["ray_resources"]["GPU"] for c in doc["counts"]] == [1.0, 2.0]
    serves = [c["serve"] for c in doc["counts"]]
    assert [v["replicas"] for v in serves] == [1, 2] and [v["clients"] for v in serves] == [1, 2]
    assert all(v["requests"] > 0 and v["errors"] == {} for v in serves)

    md = out.with_suffix(".md").read_text()
    assert "meaningless" in md and "| GPUs |" in md and "Where it stops scaling" in md
    tail = log.strip().splitlines()[-5:]  # the short table is printed last
    assert tail[0].startswith("| GPUs |") and tail[2].startswith("| 1 |") and tail[3].startswith("| 2 |"), tail
    print(f"multi_gpu.py --smoke: {wall:.0f} s")
