"""Which INT8 settings make ONNX Runtime fast on this CPU, and what they cost in mAP.

Every variant is quantized from ONE calibration table (so only the setting differs), then all
variants and FP32 are timed interleaved (inference alone, batch 8, median of rounds; wall time
and process CPU time) and evaluated on the same seeded subset of the labelled set.

    python benchmarks/int8_variants.py --table /tmp/x/defects_int8.calib.json --eval-limit 200

Without --table a table is calibrated here (--calib-images, --method). Writes
benchmarks/results/int8_variants.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))

#: name → (options for quantize_from_table, what it is)
VARIANTS: dict[str, tuple[dict, str]] = {
    "u8s8-pc-rr (default)": ({}, "uint8 asymmetric activations, int8 per-channel 7-bit weights, QDQ, float tail"),
    "u8s8-pc": ({"reduce_range": False}, "as default, 8-bit weights"),
    "u8s8-pt-rr": ({"per_channel": False}, "as default, per-tensor weights"),
    "s8s8-pc (TensorRT form)": ({"activations": "int8", "reduce_range": False},
                                "int8 symmetric activations and weights, QDQ"),
    "u8s8-pc-rr QOperator": ({"quant_format": "QOperator"}, "as default, QOperator format (QLinearConv nodes)"),
    "u8s8-pc-rr conv-only": ({"op_types": ["Conv", "MaxPool", "Resize", "Concat", "Split", "Reshape", "Add"]},
                             "as default, Sigmoid/Mul (SiLU) left float"),
    "u8s8-pc-rr no float tail": ({"no_tail": True}, "as default, head end and DFL/decode quantized too"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DATA / "models" / "yolov8n-defects.onnx"))
    p.add_argument("--table", default=None, help="calibration table from 'raydetect quantize'")
    p.add_argument("--calib", default=str(DATA / "defects" / "images" / "train"))
    p.add_argument("--calib-images", type=int, default=32)
    p.add_argument("--method", default="entropy")
    p.add_argument("--data", default=str(DATA / "defects" / "data.yaml"))
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", nargs="+", default=None, help="variant names to run")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "int8_variants"))
    args = p.parse_args(argv)

    import numpy as np
    import onnx
    import onnxruntime as ort

    from raydetect.detector import Detector
    from raydetect.evaluate import evaluate, load_dataset
    from raydetect.model_card import ModelCard
    from raydetect.quantize import (
        _named_model,
        calibrate,
        float_tail_nodes,
        load_table,
        quantize_from_table,
        select_calibration_images,
    )

    card = ModelCard.load(args.model)
    work = tempfile.mkdtemp(prefix="raydetect-int8-variants-")
    if args.table:
        table = load_table(args.table)
    else:
        cs = select_calibration_images(args.calib, args.calib_images)
        table = calibrate(card, cs, args.method, workdir=work)
    tail = float_tail_nodes(_named_model(card))
    paths = {"fp32": args.model}
    for name, (opts, _) in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        opts = dict(opts)
        excl = [] if opts.pop("no_tail", False) else tail
        out = os.path.join(work, name.split()[0] + ("-qop" if "QOperator" in name else "")
                           + ("-convonly" if "conv-only" in name else "") + ("-notail" if "no float" in name else "")
                           + ".onnx")
        quantize_from_table(card, table, out, exclude=excl, workdir=work, **opts)
        paths[name] = out
        print(f"quantized {name}: {os.path.getsize(out) / 1e6:.2f} MB", file=sys.stderr)

    x = np.random.default_rng(0).random((8, 3, *card.imgsz), dtype=np.float32)
    sessions = {}
    for name, path in paths.items():
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = len(os.sched_getaffinity(0))
        so.inter_op_num_threads = 1
        s = ort.InferenceSession(ModelCard.load(path).onnx_bytes, so, providers=["CPUExecutionProvider"])
        s.run(None, {card.input_name: x})
        sessions[name] = s
    wall = {n: [] for n in paths}
    cpu = {n: [] for n in paths}
    for _ in range(args.rounds):
        for n, s in sessions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            s.run(None, {card.input_name: x})
            wall[n].append(time.perf_counter() - t0)
            cpu[n].append(time.process_time() - c0)
    del sessions

    ds = load_dataset(args.data, "test")
    rows = []
    for n, path in paths.items():
        det = Detector({"model": path, "engine": "onnxruntime", "batch_size": 8})
        rep = evaluate(det, ds, limit=args.eval_limit)
        m = onnx.load(path)
        ops = sorted({nd.op_type for nd in m.graph.node})
        rows.append({
            "variant": n,
            "what": VARIANTS[n][1] if n in VARIANTS else "the float model",
            "mb": os.path.getsize(path) / 1e6,
            "images_per_s_b8": 8 / statistics.median(wall[n]),
            "cpu_ms_per_image_b8": statistics.median(cpu[n]) / 8 * 1e3,
            "map50": rep.map50,
            "map50_95": rep.map50_95,
            "ops": ops,
        })
        print(f"{n}: mAP@0.5 {rep.map50:.4f}", file=sys.stderr)
    base = rows[0]
    for r in rows:
        r["speedup_vs_fp32"] = r["images_per_s_b8"] / base["images_per_s_b8"]
        r["cpu_speedup_vs_fp32"] = base["cpu_ms_per_image_b8"] / r["cpu_ms_per_image_b8"]
        r["map50_drop_points"] = (base["map50"] - r["map50"]) * 100

    cmd = "python " + " ".join(["benchmarks/int8_variants.py", *(argv if argv is not None else sys.argv[1:])])
    lines = [
        "# INT8 variants on ONNX Runtime (CPU)", "",
        f"Command: `{cmd}`; onnxruntime {ort.__version__}; {time.strftime('%Y-%m-%d %H:%M %Z')}. "
        f"Calibration table: {table.method}, {len(table.images)} images. Timing: inference alone, batch 8, "
        f"{args.rounds} interleaved rounds, median (wall) and process CPU time. mAP@0.5 on "
        f"{args.eval_limit or 'all'} test images (seeded).", "",
        "| variant | MB | images/s b8 | × FP32 | CPU ms/image | CPU × FP32 | mAP@0.5 | drop (points) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['mb']:.2f} | {r['images_per_s_b8']:.1f} | {r['speedup_vs_fp32']:.2f} | "
                     f"{r['cpu_ms_per_image_b8']:.0f} | {r['cpu_speedup_vs_fp32']:.2f} | {r['map50'] * 100:.1f} | "
                     f"{r['map50_drop_points']:+.1f} |")
    md = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": cmd, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
