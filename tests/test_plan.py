"""Capacity planning arithmetic against hand-computed cases, and the `raydetect plan` CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raydetect.cli import main
from raydetect.config import ConfigError, PlanConfig, validate
from raydetect.plan import BenchPoint, PlanError, choose_point, gpus_needed, make_plan
from tests.conftest import REPO


def bench(*rows, device="cuda:0"):
    """A bench JSON as `raydetect bench` writes it: (batch, img/s, p50 ms, p99 ms) per row."""
    return {
        "schema": "raydetect.bench/1",
        "device": device,
        "results": [
            {
                "batch_size": b,
                "end_to_end": {"images_per_s": r, "latency_ms": {"p50": p50, "p99": p99, "mean": p50}},
                "engine": {"images_per_s": 2 * r, "latency_ms": {"p50": p50 / 2, "p99": p99 / 2, "mean": p50 / 2}},
            }
            for b, r, p50, p99 in rows
        ],
    }


@pytest.mark.parametrize(
    "streams, fps, per_gpu, headroom, exact, gpus",
    [
        (64, 10, 80, 1.5, 12.0, 12),  # the seeds' example: 640 frames/s ÷ 80 = 8, × 1.5 = 12
        (64, 10, 80, 1.0, 8.0, 8),
        (65, 10, 80, 1.5, 12.1875, 13),  # 650 ÷ 80 = 8.125, × 1.5 = 12.1875 → 13
        (1, 1, 1000, 1.5, 0.0015, 1),  # any load needs one GPU
        (100, 25, 310, 1.2, 9.67741935483871, 10),  # 2500 ÷ 310 = 8.0645..., × 1.2 = 9.677...
        (30, 0.1, 1, 1.0, 3.0, 3),  # 0.1 is not exact in binary: 30 × 0.1 = 3.0000000000000004 → 3
    ],
)
def test_gpus_needed_hand_computed(streams, fps, per_gpu, headroom, exact, gpus):
    e, n = gpus_needed(streams, fps, per_gpu, headroom)
    assert e == pytest.approx(exact) and n == gpus


def test_latency_bound_picks_largest_batch_within_it():
    pts = [BenchPoint(1, 40, 20, 25), BenchPoint(4, 90, 40, 48), BenchPoint(8, 120, 70, 90), BenchPoint(16, 140, 150, 200)]
    assert choose_point(pts).batch_size == 16  # no bound: highest throughput
    assert choose_point(pts, 50).batch_size == 4
    assert choose_point(pts, 90).batch_size == 8  # inclusive
    with pytest.raises(PlanError, match="lowest is 25.0 ms at batch 1"):
        choose_point(pts, 10)


def test_plan_from_bench_uses_the_chosen_batch_throughput():
    b = bench((1, 40, 20, 25), (4, 80, 40, 48), (8, 120, 70, 90))
    cfg = PlanConfig(streams=64, fps=10, latency_ms=50)
    plan = make_plan(cfg, b)
    assert (plan.batch_size, plan.per_gpu_fps, plan.gpus) == (4, 80, 12)  # 640 ÷ 80 × 1.5 = 12
    text = "\n".join(plan.lines())
    assert "64 streams × 10 fps = 640 frames/s" in text
    assert "batch 4, p99 48 ms ≤ 50 ms" in text
    assert "ceil(640 ÷ 80 × 1.5) = ceil(12.000) = 12" in text
    plan = make_plan(PlanConfig(streams=64, fps=10), b)  # no bound: batch 8 at 120/s → 8
    assert (plan.batch_size, plan.gpus) == (8, 8)
    plan = make_plan(PlanConfig(streams=64, fps=10, latency_ms=50), b, stage="engine")
    assert (plan.batch_size, plan.per_gpu_fps, plan.gpus) == (8, 240, 4)  # engine p99 45 ms ≤ 50


def test_plan_input_errors():
    with pytest.raises(PlanError, match="missing or bad field"):
        make_plan(PlanConfig(streams=1, fps=1), {"results": [{"batch_size": 1}]})
    with pytest.raises(PlanError, match="needs --bench"):
        make_plan(PlanConfig(streams=1, fps=1, per_gpu_fps=10, latency_ms=5))
    with pytest.raises(ConfigError, match=r"plan.fps: Input should be greater than 0"):
        validate(PlanConfig, {"streams": 4, "fps": 0}, "plan")
    with pytest.raises(ConfigError, match=r"plan.headroom: Input should be greater than or equal to 1"):
        validate(PlanConfig, {"streams": 4, "fps": 5, "headroom": 0.9}, "plan")
    with pytest.raises(ConfigError, match=r"plan.streams"):
        validate(PlanConfig, {"streams": 0, "fps": 5}, "plan")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "raydetect.cli", "plan", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_prints_the_arithmetic(tmp_path, capsys):
    p = run_cli("--streams", "64", "--fps", "10", "--per-gpu-fps", "80")  # the real command line
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1] == "GPUs      = ceil(640 ÷ 80 × 1.5) = ceil(12.000) = 12"
    f = tmp_path / "bench.json"
    f.write_text(json.dumps(bench((1, 40, 20, 25), (4, 80, 40, 48), device="cpu")))
    assert main(["plan", "--streams", "64", "--fps", "10", "--bench", str(f), "--latency-ms", "50", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"] == 12
    assert main(["plan", "--streams", "64", "--fps", "10", "--bench", str(f), "--latency-ms", "5"]) == 2
    assert "no measured batch size has p99 latency <= 5 ms" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["plan", "--streams", "64", "--fps", "10"])
    assert e.value.code == 2 and "one of the arguments --bench --per-gpu-fps is required" in capsys.readouterr().err
