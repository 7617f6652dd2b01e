"""Where a replica of the online endpoint spends its time per engine call, without HTTP:
``Detector.detect`` on n copies of one encoded image (what ``@serve.batch`` hands it), split
into its stages with a device sync after each, plus the JSON encoding of the responses, and a
cProfile of whole calls (top functions by own time).

    python benchmarks/serve_profile.py --precision fp16        # on a GPU machine

Writes ``<out>.json`` and ``<out>.md``; the table is printed last.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))


def _sync(detector) -> None:
    import torch

    if detector.gpu is not None and detector.gpu.device.type == "cuda":
        torch.cuda.synchronize()


def stages(detector, images: list[bytes]) -> dict[str, float]:
    """One call split into the GPU path's stages (ms), a sync after each."""
    t0 = time.perf_counter()
    p = detector.prepare(images)
    _sync(detector)
    t1 = time.perf_counter()
    n = len(p.rows)
    conf, iou, max_det = [0.25] * n, [0.45] * n, [300] * n
    preds = detector.infer(p, conf, iou, max_det)
    _sync(detector)
    t2 = time.perf_counter()
    rows = detector.rows(preds, conf, iou, max_det)
    t3 = time.perf_counter()
    detector.to_detections(rows, p.geoms, [p.sizes[i] for i in p.rows])
    t4 = time.perf_counter()
    return {"prepare": (t1 - t0) * 1e3, "infer": (t2 - t1) * 1e3, "nms_to_host": (t3 - t2) * 1e3,
            "to_detections": (t4 - t3) * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DATA / "models" / "yolov8n-defects.onnx"))
    p.add_argument("--engine", default="auto")
    p.add_argument("--precision", default="fp16")
    p.add_argument("--image", default=str(DATA / "images" / "bus.jpg"))
    p.add_argument("--device", default=None, help="torch engine device (default: cuda)")
    p.add_argument("--sizes", default="1,8,16,32")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "serve_profile"))
    args = p.parse_args(argv)

    from raydetect.config import DetectorConfig
    from raydetect.detector import Detector

    sizes = [int(s) for s in args.sizes.split(",")]
    body = Path(args.image).read_bytes()
    extra = {} if args.device is None else {"device": args.device}
    det = Detector(DetectorConfig(model=args.model, engine=args.engine, precision=args.precision,
                                  batch_size=max(sizes), **extra))
    rows, profiles = [], {}
    for n in sizes:
        images = [body] * n
        for _ in range(3):
            det.detect(images)
        walls, parts, enc = [], [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            results = det.detect(images)
            walls.append((time.perf_counter() - t0) * 1e3)
            t1 = time.perf_counter()
            for r in results:
                json.dumps(r.to_dict())
            enc.append((time.perf_counter() - t1) * 1e3)
            if det.gpu is not None:
                parts.append(stages(det, images))
        row = {"n": n, "detect_ms": statistics.median(walls), "per_image_ms": statistics.median(walls) / n,
               "json_ms": statistics.median(enc), "detections": len(results[0].detections)}
        for k in (parts[0] if parts else {}):
            row[k + "_ms"] = statistics.median(x[k] for x in parts)
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if n in (sizes[0], sizes[-1]):
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.rounds):
                det.detect(images)
            prof.disable()
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
            profiles[n] = s.getvalue()
            print(f"--- cProfile n={n}, {args.rounds} calls, by own time ---\n" + profiles[n][-4000:], flush=True)

    info = det.info()
    cols = [c for c in ("prepare_ms", "infer_ms", "nms_to_host_ms", "to_detections_ms") if c in rows[0]]
    md = ["# Replica work per engine call (benchmarks/serve_profile.py)", "",
          f"Command: `python benchmarks/serve_profile.py {' '.join(argv if argv is not None else sys.argv[1:])}`  ",
          f"Model `{args.model}` ({info['engine']}, {info['precision']}, {info['device']}); image "
          f"`{args.image}` ({len(body)} bytes); medians of {args.rounds} calls.", "",
          "| images | detect ms | per image ms | " + " | ".join(c[:-3] + " ms" for c in cols) + " | JSON ms |",
          "|---:|---:|---:|" + "---:|" * len(cols) + "---:|"]
    for r in rows:
        md.append(f"| {r['n']} | {r['detect_ms']:.2f} | {r['per_image_ms']:.3f} | "
                  + " | ".join(f"{r[c]:.2f}" for c in cols) + f" | {r['json_ms']:.2f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "info": {k: str(v) for k, v in info.items()},
                                                    "rows": rows, "profiles": profiles}, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
