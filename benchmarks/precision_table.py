"""FP32 / FP16 / INT8 comparison table: model size, latency, images/s, peak memory, mAP.

Every row is one (engine, precision, model) running in its own worker process, so its peak
memory (RSS; on CUDA also torch's peak allocation) is its own. All rows are loaded first, then
timed interleaved — round r times row A, then row B, … — so that a shared, noisy CPU slows
every row alike; images/s is the median of the rounds. mAP comes last, through the same
``Detector.detect`` and ``raydetect.evaluate`` as ``raydetect eval``.

Rows by default: ONNX Runtime FP32 and INT8 (CPU); with a CUDA GPU also torch FP32/FP16 and
TensorRT FP32/FP16 when those engines can run. ``--int8`` names the INT8 model; without it the
script makes one with ``raydetect quantize`` defaults (300 train images, entropy).

    python benchmarks/precision_table.py                       # CPU rows, full defects test set
    python benchmarks/precision_table.py --eval-limit 100      # quicker mAP
    python benchmarks/precision_table.py --rows torch:fp32 torch:fp16 tensorrt:fp16   # on a GPU

Writes benchmarks/results/precision_table.json and .md and prints the table last. Needs no Ray.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"
CPU_ENGINES = ("onnxruntime", "openvino")


# --- worker process -----------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return r / 1024 if sys.platform != "darwin" else r / 1024 / 1024


def _worker(conn, row: dict) -> None:
    """Serve timing / evaluation requests for one row until told to stop."""
    try:
        from raydetect.detector import Detector

        det = Detector({"model": row["model"], "engine": row["engine"], "precision": row["precision"],
                        "batch_size": 8, "conf": 0.25, "device": row.get("device")})
        images = [Path(p).read_bytes() for p in row["images"]]
        from raydetect.stages.preprocess import decode_image, letterbox, to_tensor

        h, w = det.card.imgsz
        x = to_tensor([letterbox(decode_image(b, 10**9, 10**9), h, w)[0] for b in images[:8]])
        engine = det.engine
        torch = sys.modules.get("torch")
        if engine.input_kind == "torch":
            import torch

            x = torch.from_numpy(x).to(engine.device)

        def sync() -> None:
            if torch is not None and torch.cuda.is_available():
                torch.cuda.synchronize()

        def run_engine(n: int):
            out = engine.infer(x[:n])
            sync()
            return out

        for _ in range(2):  # warm-up: both batch sizes, both paths
            det.detect(images[:8])
            det.detect(images[:1])
            run_engine(8)
        sync()
        conn.send({"ok": True, "info": det.info()})
        while True:
            msg = conn.recv()
            op = msg["op"]
            if op == "stop":
                break
            if op == "time":
                n, reps, what = msg["batch"], msg["reps"], msg["what"]
                walls, cpus = [], []
                for _ in range(reps):
                    t0, c0 = time.perf_counter(), time.process_time()
                    if what == "detect":
                        det.detect(images[:n])
                    else:
                        run_engine(n)
                    sync()
                    walls.append(time.perf_counter() - t0)
                    cpus.append(time.process_time() - c0)
                conn.send({"wall": walls, "cpu": cpus})
            elif op == "memory":
                gpu = None
                if torch is not None and torch.cuda.is_available():
                    gpu = torch.cuda.max_memory_allocated() / 2**20
                conn.send({"peak_rss_mb": _peak_rss_mb(), "peak_cuda_mb": gpu})
            elif op == "eval":
                from raydetect.evaluate import evaluate, load_dataset

                ds = load_dataset(msg["data"], msg["split"])
                rep = evaluate(det, ds, limit=msg["limit"], batch_size=16)
                conn.send({"map50": rep.map50, "map50_95": rep.map50_95, "images": rep.images_evaluated,
                           "eval_images_per_s": rep.images_per_s,
                           "per_class": [{"name": c.name, "ap50": c.ap50, "ap50_95": c.ap50_95}
                                         for c in rep.per_class]})
    except Exception as e:  # report to the parent instead of dying silently
        import traceback

        conn.send({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})


# --- rows ---------------------------------------------------------------------------------------


def default_rows(fp32: str, int8: str | None) -> list[dict]:
    rows = [{"engine": "onnxruntime", "precision": "fp32", "model": fp32, "device": "cpu"}]
    if int8:
        rows.append({"engine": "onnxruntime", "precision": "int8", "model": int8, "device": "cpu"})
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda:
        from raydetect.engines import engine_class

        for name in ("torch", "tensorrt"):
            try:
                why = engine_class(name).availability()
            except Exception as e:
                why = str(e)
            if why is not None:
                print(f"skipping {name}: {why}", file=sys.stderr)
                continue
            for prec in ("fp32", "fp16"):
                rows.append({"engine": name, "precision": prec, "model": fp32, "device": "cuda"})
    return rows


def parse_rows(specs: list[str], fp32: str, int8: str | None) -> list[dict]:
    rows = []
    for s in specs:
        parts = s.split(":")
        if len(parts) not in (2, 3, 4):
            raise SystemExit(f"--rows: expected engine:precision[:model[:label]], got {s!r}")
        engine, prec = parts[0], parts[1]
        model = parts[2] if len(parts) >= 3 and parts[2] else (int8 if prec == "int8" else fp32)
        if model is None:
            raise SystemExit(f"--rows {s}: an int8 row needs --int8 MODEL (or engine:int8:MODEL)")
        row = {"engine": engine, "precision": prec, "model": model,
               "device": "cpu" if engine in CPU_ENGINES else "cuda"}
        if len(parts) == 4:
            row["label"] = parts[3]
        rows.append(row)
    return rows


def ensure_int8(fp32: str, out: Path, calib: str, images: int) -> str:
    if out.exists():
        return str(out)
    from raydetect.quantize import quantize

    print(f"quantizing {fp32} → {out} (calibration: {images} images from {calib})", file=sys.stderr)
    rep = quantize({"model": fp32, "calib": calib, "out": str(out), "images": images})
    print(f"INT8: {rep.out} ({rep.int8_bytes / 1e6:.2f} MB), method {rep.method}", file=sys.stderr)
    return str(out)


# --- measuring ------------------------------------------------------------------------------------


def _gflops(model: str) -> float | None:
    from raydetect.model_card import ModelCard
    from raydetect.model_stats import onnx_gflops

    try:
        card = ModelCard.load(model)
        return onnx_gflops(card.onnx_bytes, card.imgsz)
    except Exception as e:  # an engine-only format: the row still runs
        print(f"{model}: GFLOPs not counted ({e})", file=sys.stderr)
        return None


class Row:
    def __init__(self, spec: dict, images: list[str]) -> None:
        self.spec = spec
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, {**spec, "images": images}), daemon=True)
        self.proc.start()
        self.info: dict = {}
        self.error: str | None = None
        self.result: dict = {"engine": spec["engine"], "precision": spec["precision"], "model": spec["model"],
                             "model_mb": os.path.getsize(spec["model"]) / 1e6, "label": spec.get("label", ""),
                             "gflops": _gflops(spec["model"])}

    @property
    def label(self) -> str:
        return f"{self.spec['engine']} {self.spec['precision']}"

    def ready(self) -> bool:
        msg = self.conn.recv()
        if not msg.get("ok"):
            self.error = msg.get("error")
            print(f"{self.label}: {self.error}\n{msg.get('trace', '')}", file=sys.stderr)
            self.stop()
            return False
        self.info = msg["info"]
        self.result["device"] = self.info.get("device")
        self.result["threads"] = self.info.get("threads")
        return True

    def ask(self, **msg) -> dict:
        self.conn.send(msg)
        reply = self.conn.recv()
        if reply.get("ok") is False:
            raise RuntimeError(f"{self.label}: {reply['error']}\n{reply.get('trace', '')}")
        return reply

    def stop(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send({"op": "stop"})
            except (BrokenPipeError, OSError):
                pass
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.terminate()


def measure(rows: list[Row], rounds: int, reps: int) -> None:
    """Interleaved: in each round every row runs ``reps`` timed calls per measurement."""
    keys = [("detect", 1), ("detect", 8), ("engine", 8)]
    samples = {id(r): {k: {"wall": [], "cpu": []} for k in keys} for r in rows}
    for rnd in range(rounds):
        for what, n in keys:
            for r in rows:
                rep = r.ask(op="time", batch=n, reps=reps, what=what)
                # one sample per round: the median of its reps
                samples[id(r)][(what, n)]["wall"].append(statistics.median(rep["wall"]))
                samples[id(r)][(what, n)]["cpu"].append(statistics.median(rep["cpu"]))
        print(f"timing round {rnd + 1}/{rounds} done", file=sys.stderr)
    for r in rows:
        s = samples[id(r)]
        d1, d8, e8 = s[("detect", 1)], s[("detect", 8)], s[("engine", 8)]
        r.result.update(
            latency_b1_ms=statistics.median(d1["wall"]) * 1e3,
            latency_b8_ms=statistics.median(d8["wall"]) * 1e3,
            images_per_s_b8=8 / statistics.median(d8["wall"]),
            engine_images_per_s_b8=8 / statistics.median(e8["wall"]),
            cpu_s_per_image_b8=statistics.median(d8["cpu"]) / 8,
            rounds_images_per_s_b8=[8 / w for w in d8["wall"]],
            rounds_engine_images_per_s_b8=[8 / w for w in e8["wall"]],
        )
        r.result.update(r.ask(op="memory"))


def _ms(v):
    return None if v is None else v * 1e3


def fmt(v, nd=1, pct=False):
    if v is None:
        return "–"
    return f"{v * 100:.1f}" if pct else f"{v:.{nd}f}"


def markdown(results: list[dict], checks: list[dict], meta: dict, summary: dict | None = None) -> str:
    head = ("| model | engine | precision | device | model MB | GFLOPs | latency b1 ms | latency b8 ms | images/s b8 | "
            "engine images/s b8 | CPU ms/image b8 | peak RSS MB | peak CUDA MB | mAP@0.5 | mAP@0.5:0.95 |")
    lines = [head, "|" + "---|" * 15]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r.get('label') or '–'} | {r['engine']} | {r['precision']} | – | "
                         f"{fmt(r.get('model_mb'), 2)} | {fmt(r.get('gflops'), 2)} | "
                         f"failed: {r['error'][:80]} |" + " |" * 8)
            continue
        lines.append(
            f"| {r.get('label') or '–'} | {r['engine']} | {r['precision']} | {r.get('device') or '–'} | "
            f"{fmt(r['model_mb'], 2)} | {fmt(r.get('gflops'), 2)} | "
            f"{fmt(r.get('latency_b1_ms'))} | {fmt(r.get('latency_b8_ms'))} | {fmt(r.get('images_per_s_b8'))} | "
            f"{fmt(r.get('engine_images_per_s_b8'))} | {fmt(_ms(r.get('cpu_s_per_image_b8')))} | "
            f"{fmt(r.get('peak_rss_mb'), 0)} | "
            f"{fmt(r.get('peak_cuda_mb'), 0)} | {fmt(r.get('map50'), pct=True)} | {fmt(r.get('map50_95'), pct=True)} |"
        )
    out = ["# Precision table", "", f"Command: `{meta['command']}`", "",
           f"Machine: {meta['machine']}; {meta['date']}. mAP on {meta['eval']} "
           "(pycocotools, conf 0.001, NMS IoU 0.7, max_det 300; in points). "
           f"Timing: {meta['rounds']} interleaved rounds × {meta['reps']} calls, median; "
           "latency and images/s are end-to-end `Detector.detect` on encoded images "
           "(decode, letterbox, inference, NMS); 'engine images/s' is inference alone; 'CPU ms/image' is "
           "the process CPU time per image at batch 8 (all threads; less sensitive to a busy machine); "
           "peak RSS is the worker process's maximum resident set; peak CUDA is torch's allocator peak "
           "(TensorRT's own allocations are not in it).",
           "", *lines, ""]
    if checks:
        out += ["| check | measured | target | result |", "|---|---|---|---|"]
        for c in checks:
            out.append(f"| {c['name']} | {c['measured']:.3f} | {c['target']} | {'pass' if c['passed'] else 'FAIL'} |")
        out.append("")
    if summary:
        out += ["Summary (speed-ups: median over the interleaved rounds of row / ORT FP32 in the same round):", "",
                "```json", json.dumps(summary, indent=1, sort_keys=True), "```", ""]
    return "\n".join(out)


def _round_ratio(r: dict, base: dict, key: str) -> float:
    """Median over the interleaved rounds of (row / baseline) in the same round."""
    a, b = r.get(f"rounds_{key}"), base.get(f"rounds_{key}")
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b, strict=True))
    return r[key] / base[key]


def summary_for(results: list[dict], max_drop: float) -> dict:
    """Compressed CPU rows against the ONNX Runtime FP32 baseline (the first such row): speed-ups
    are medians of per-round ratios (the rows are timed interleaved); the best INT8 row is the
    fastest whose mAP@0.5 drop is within ``max_drop`` points (the fastest at all when none is)."""
    ok = [r for r in results if not r.get("error")]
    base = next((r for r in ok if r["engine"] == "onnxruntime" and r["precision"] == "fp32"), None)
    if base is None:
        return {}
    for r in ok:
        if r.get("device") == "cpu" and "images_per_s_b8" in r:
            r["speedup_e2e_vs_ort_fp32"] = _round_ratio(r, base, "images_per_s_b8")
            r["speedup_engine_vs_ort_fp32"] = _round_ratio(r, base, "engine_images_per_s_b8")
            if r.get("map50") is not None and base.get("map50") is not None:
                r["map50_drop_points"] = 100 * (base["map50"] - r["map50"])
    out: dict = {"baseline": f"{base.get('label') or 'baseline'} onnxruntime fp32",
                 "baseline_images_per_s_b8": base["images_per_s_b8"], "max_map50_drop_points": max_drop}
    ov = next((r for r in ok if r["engine"] == "openvino" and r["precision"] == "fp32" and r["model"] == base["model"]),
              None)
    if ov:
        out["openvino_fp32_speedup_e2e"] = ov["speedup_e2e_vs_ort_fp32"]
        out["openvino_fp32_speedup_engine"] = ov["speedup_engine_vs_ort_fp32"]
    int8 = [r for r in ok if r["precision"] == "int8" and "speedup_e2e_vs_ort_fp32" in r]
    if int8:
        within = [r for r in int8 if r.get("map50_drop_points") is not None and r["map50_drop_points"] <= max_drop]
        best = max(within or int8, key=lambda r: r["speedup_e2e_vs_ort_fp32"])
        out.update(best_cpu_int8_row=f"{best.get('label') or '–'} {best['engine']} {best['precision']}",
                   best_cpu_int8_speedup_e2e=best["speedup_e2e_vs_ort_fp32"],
                   best_cpu_int8_speedup_engine=best["speedup_engine_vs_ort_fp32"],
                   best_cpu_int8_map50_drop=best.get("map50_drop_points"),
                   best_cpu_int8_within_max_drop=bool(within))
    pruned = [r for r in ok if "pruned" in (r.get("label") or "") and r.get("gflops")]
    if pruned and base.get("gflops"):
        out["pruned_gflops"] = min(r["gflops"] for r in pruned)
        out["baseline_gflops"] = base["gflops"]
        out["pruned_flops_ratio"] = out["pruned_gflops"] / base["gflops"]
    return out


def acceptance_checks(summary: dict) -> list[dict]:
    """Issue 18's targets for the compressed models."""
    out = []
    if "best_cpu_int8_speedup_e2e" in summary:
        out.append({"name": f"best compressed CPU INT8 ({summary['best_cpu_int8_row']}) images/s b8 end-to-end "
                            "vs ORT FP32", "measured": summary["best_cpu_int8_speedup_e2e"], "target": ">= 2.5"})
        if summary.get("best_cpu_int8_map50_drop") is not None:
            out.append({"name": "its mAP@0.5 drop vs ORT FP32 (points)",
                        "measured": summary["best_cpu_int8_map50_drop"], "target": "<= 1.5"})
    if "pruned_flops_ratio" in summary:
        out.append({"name": "pruned FLOPs reduction (1 - pruned/baseline GFLOPs)",
                    "measured": 1 - summary["pruned_flops_ratio"], "target": ">= 0.3"})
    for c in out:
        t = float(c["target"].split()[-1])
        c["passed"] = c["measured"] >= t if c["target"].startswith(">=") else c["measured"] <= t
    return out


def checks_for(results: list[dict], max_drop: float) -> list[dict]:
    by: dict = {}
    for r in results:  # the first row of each kind: the baseline model's
        if not r.get("error"):
            by.setdefault((r["engine"], r["precision"]), r)
    fp32, int8 = by.get(("onnxruntime", "fp32")), by.get(("onnxruntime", "int8"))
    if not (fp32 and int8):
        return []
    out = [
        {"name": "INT8/FP32 images/s at batch 8 (ORT CPU, end-to-end)",
         "measured": int8["images_per_s_b8"] / fp32["images_per_s_b8"], "target": ">= 1.5"},
        {"name": "INT8/FP32 images/s at batch 8 (ORT CPU, inference only)",
         "measured": int8["engine_images_per_s_b8"] / fp32["engine_images_per_s_b8"], "target": ">= 1.5"},
        {"name": "FP32/INT8 model file size", "measured": fp32["model_mb"] / int8["model_mb"], "target": ">= 3.5"},
    ]
    if fp32.get("map50") is not None and int8.get("map50") is not None:
        out.append({"name": "mAP@0.5 drop FP32 → INT8 (points)",
                    "measured": (fp32["map50"] - int8["map50"]) * 100, "target": f"<= {max_drop}"})
    for c in out:
        t = float(c["target"].split()[-1])
        c["passed"] = c["measured"] >= t if c["target"].startswith(">=") else c["measured"] <= t
    return out


def machine() -> str:
    cpu = platform.processor() or ""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not cpu:
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    fl = set(line.split(":", 1)[1].split())
                    flags = ",".join(x for x in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if x in fl)
                    break
    except OSError:
        pass
    desc = f"{cpu} ({os.cpu_count()} CPUs visible; {flags or 'no AVX2'})"
    try:
        import torch

        if torch.cuda.is_available():
            desc += f"; GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except ImportError:
        pass
    import onnxruntime

    return desc + f"; onnxruntime {onnxruntime.__version__}; Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DATA / "models" / "yolov8n-defects.onnx"), help="FP32 model")
    p.add_argument("--int8", default=None, help="INT8 QDQ model (default: make one under --work)")
    p.add_argument("--work", default="/tmp/raydetect-precision", help="where a generated INT8 model goes")
    p.add_argument("--calib", default=str(DATA / "defects" / "images" / "train"))
    p.add_argument("--calib-images", type=int, default=300)
    p.add_argument("--data", default=str(DATA / "defects" / "data.yaml"), help="labelled set for mAP")
    p.add_argument("--split", default="test")
    p.add_argument("--eval-limit", type=int, default=None, help="mAP on N images (default all)")
    p.add_argument("--no-map", action="store_true", help="skip mAP")
    p.add_argument("--images", default=str(DATA / "defects" / "images" / "test"),
                   help="folder whose first 8 images are timed")
    p.add_argument("--rows", nargs="+", default=None, help="engine:precision[:model] (default: auto)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per round and measurement")
    p.add_argument("--max-map-drop", type=float, default=1.0)
    p.add_argument("--max-compressed-drop", type=float, default=1.5,
                   help="mAP@0.5 points a compressed row may lose to count as the best (summary)")
    p.add_argument("--out", default=str(RESULTS / "precision_table"), help="output path without suffix")
    args = p.parse_args(argv)

    int8 = args.int8
    if int8 is None and (args.rows is None or any(":int8" in r for r in args.rows)):
        int8 = ensure_int8(args.model, Path(args.work) / (Path(args.model).stem + "_int8.onnx"),
                           args.calib, args.calib_images)
    specs = parse_rows(args.rows, args.model, int8) if args.rows else default_rows(args.model, int8)
    images = sorted(str(q) for q in Path(args.images).iterdir()
                    if q.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))[:8]
    if len(images) < 8:
        raise SystemExit(f"--images {args.images}: need 8 images, found {len(images)}")

    rows = [Row(s, images) for s in specs]
    live = [r for r in rows if r.ready()]
    try:
        measure(live, args.rounds, args.reps)
        if not args.no_map:
            for r in live:
                print(f"mAP: {r.label} …", file=sys.stderr)
                r.result.update(r.ask(op="eval", data=args.data, split=args.split, limit=args.eval_limit))
    finally:
        for r in rows:
            r.stop()
    results = []
    for r in rows:
        res = dict(r.result)
        if r.error:
            res["error"] = r.error
        results.append(res)
    checks = checks_for(results, args.max_map_drop)
    summary = summary_for(results, args.max_compressed_drop)
    checks += acceptance_checks(summary)
    meta = {
        "command": "python " + " ".join([os.path.relpath(__file__, REPO), *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "eval": "not measured" if args.no_map else
                f"{args.data} split {args.split}" + (f", {args.eval_limit} images" if args.eval_limit else ", all images"),
        "rounds": args.rounds,
        "reps": args.reps,
    }
    md = markdown(results, checks, meta, summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results, "checks": checks, "summary": summary},
                                                   indent=2, sort_keys=True) + "\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
