"""`raydetect bench`: a real (short) run of the ONNX Runtime engine; the JSON shape `raydetect plan`
reads, and values that must hold whatever the machine's speed."""

from __future__ import annotations

import json

import pytest

from raydetect.bench import latency_stats, peak_rss_mb, reset_peak_rss
from raydetect.cli import main
from raydetect.config import ConfigError, PlanConfig
from raydetect.plan import bench_points, make_plan
from tests.conftest import IMAGES, MODELS


def test_latency_stats_hand_computed():
    s = latency_stats([0.1, 0.2, 0.3, 0.4], batch=4)
    assert s["calls"] == 4 and s["images_per_s"] == pytest.approx(16 / 1.0)
    assert s["latency_ms"]["p50"] == pytest.approx(250.0) and s["latency_ms"]["mean"] == pytest.approx(250.0)
    assert s["latency_ms"]["p99"] == pytest.approx(397.0)  # numpy's linear interpolation


def test_peak_rss_resets_and_grows():
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs here")
    base = peak_rss_mb()
    blob = bytearray(200 * 2**20)  # touch 200 MB
    blob[::4096] = b"x" * len(blob[::4096])
    assert peak_rss_mb() >= base + 150
    del blob
    reset_peak_rss()
    assert peak_rss_mb() < base + 150


def test_bench_cli_writes_json_plan_can_read(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(MODELS / "yolov8n-dynamic-random.onnx"), "--images", str(IMAGES),
               "--batch-sizes", "1,2", "--iterations", "2", "--warmup", "1", "--engine", "onnxruntime",
               "--threads", "1", "--conf", "0.0001", "--out", str(out)])
    assert rc == 0
    cap = capsys.readouterr()
    printed = cap.out
    assert "batch    1: engine" in printed and f"wrote {out}" in printed
    assert "bench: 4/4 timings in " in cap.err  # the progress line at the end (not a terminal here)
    res = json.loads(out.read_text())
    assert res["schema"] == "raydetect.bench/1" and res["device"] == "cpu"
    assert res["engine"]["engine"] == "onnxruntime" and res["model"]["sha256"]
    assert [r["batch_size"] for r in res["results"]] == [1, 2]
    for r in res["results"]:
        for stage in ("engine", "end_to_end"):
            s = r[stage]
            assert s["calls"] >= 2 and s["images_per_s"] > 0
            lat = s["latency_ms"]
            assert 0 < lat["p50"] <= lat["p99"]
            # images/s is images ÷ summed call time: consistent with the mean latency
            assert s["images_per_s"] == pytest.approx(r["batch_size"] / (lat["mean"] / 1e3), rel=1e-6)
        assert r["peak_memory_mb"]["rss"] > 50 and r["peak_memory_mb"]["gpu"] is None
    pts = bench_points(res)
    assert [p.batch_size for p in pts] == [1, 2]
    plan = make_plan(PlanConfig(streams=2, fps=1), res)
    assert plan.gpus >= 1 and plan.per_gpu_fps == max(p.images_per_s for p in pts)


def test_bench_config_errors():
    with pytest.raises(ConfigError, match=r"bench.batch_sizes: Value error, batch sizes must be in 1..4096"):
        from raydetect.config import BenchConfig, DetectorConfig, validate

        validate(BenchConfig, {"detector": DetectorConfig(model="m.onnx"), "batch_sizes": (0, 8)}, "bench")
    assert main(["bench", "--model", str(MODELS / "yolov8n-random.onnx"), "--images", "/nonexistent/dir"]) == 2
