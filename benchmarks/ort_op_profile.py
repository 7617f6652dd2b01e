"""Where ONNX Runtime spends its time, per operator type, for FP32 and INT8 models (batch 8).

    python benchmarks/ort_op_profile.py MODEL_FP32.onnx MODEL_INT8.onnx

Uses ONNX Runtime's own profiler (kernel times of 3 runs after a warm-up, summed per op type).
Writes benchmarks/results/ort_op_profile.md and prints it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def profile(path: str, runs: int = 3, batch: int = 8) -> tuple[float, dict[str, float]]:
    import numpy as np
    import onnxruntime as ort

    from raydetect.model_card import ModelCard

    card = ModelCard.load(path)
    x = np.random.default_rng(0).random((batch, 3, *card.imgsz), dtype=np.float32)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = len(os.sched_getaffinity(0))
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "ort")
    s = ort.InferenceSession(card.onnx_bytes, so, providers=["CPUExecutionProvider"])
    s.run(None, {card.input_name: x})  # warm-up (also profiled; subtracted below)
    for _ in range(runs):
        s.run(None, {card.input_name: x})
    events = json.load(open(s.end_profiling()))
    per_run: dict[str, float] = defaultdict(float)
    runs_seen = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs_seen += 1
    node_events = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    # the first run is the warm-up: drop its share (runs_seen = runs + 1)
    for e in node_events:
        per_run[e["args"]["op_name"]] += e["dur"] / 1e3 / runs_seen
    return sum(per_run.values()), dict(per_run)


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        raise SystemExit(__doc__)
    import onnxruntime as ort

    lines = ["# ONNX Runtime time per operator type (batch 8, ms per run)", "",
             f"Command: `python benchmarks/ort_op_profile.py {' '.join(paths)}`; onnxruntime {ort.__version__}; "
             f"{time.strftime('%Y-%m-%d %H:%M %Z')}. Kernel time summed per op type, averaged over the profiled runs.", ""]
    for p in paths:
        total, ops = profile(p)
        lines += [f"## {os.path.basename(p)}: {total:.0f} ms per batch of 8", "", "| op | ms | share |", "|---|---|---|"]
        for op, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:12]:
            lines.append(f"| {op} | {ms:.1f} | {100 * ms / total:.1f} % |")
        lines.append("")
    md = "\n".join(lines)
    out = REPO / "benchmarks" / "results" / "ort_op_profile.md"
    out.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
