"""Host time per image of the GPU data path's input checks (issue 12: the Ray job is host-bound).

Before an image goes to the GPU's JPEG decoder, the host checks it: size limits, a truncation
check (the end-of-image marker after the first scan), the header (size, colour, EXIF, progressive).
This times those checks per image, in one process, for the truncation check as it was until
2026-12-07 (a forward search for FFD9 through the entropy-coded data) and as it is now (the same
question answered by a search from the end), on 640x480 JPEGs made from the real photos (as
``gpu_pipeline.py``'s coco640 set) and on the photos themselves, and checks that both answer alike
on every input, truncated ones included. Medians of ``--repeats`` timed passes (CPU timings are
noisy). No GPU needed: this is the host's share.

    python benchmarks/host_checks.py --out benchmarks/results/host_checks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))

from raydetect.stages import preprocess  # noqa: E402
from raydetect.stages.gpu_preprocess import probe_jpeg  # noqa: E402
from raydetect.stages.preprocess import check_encoded, check_pixels  # noqa: E402


def has_eoi_forward(data: bytes) -> bool:
    """The truncation check until 2026-12-07: walk the markers to the first scan, then search
    forward for FFD9 through the entropy-coded data."""
    n, pos = len(data), 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return b"\xff\xd9" in data
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0xD9:
            return True
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xDA:
            return data.find(b"\xff\xd9", pos + 2) >= 0
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def host_checks(data: bytes) -> None:
    """What GpuPreprocessor.decode does on the host for one JPEG before the GPU decodes it."""
    check_encoded(data, 64 * 1024 * 1024)
    info = probe_jpeg(data)
    check_pixels(info.width, info.height, 40_000_000)


def jpeg_sets() -> dict[str, list[bytes]]:
    photos = sorted((DATA / "images").glob("*.jpg"))
    coco640 = []
    for p in photos:
        im = cv2.imread(str(p))
        for q in (75, 90):
            small = cv2.resize(im, (640, 480), interpolation=cv2.INTER_AREA)
            coco640.append(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes())
    return {"coco640": coco640, "photos": [p.read_bytes() for p in photos]}


def per_image_us(blobs: list[bytes], fn, repeats: int, passes: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(passes):
            for b in blobs:
                fn(b)
        ts.append((time.perf_counter() - t0) / (passes * len(blobs)))
    return statistics.median(ts) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--passes", type=int, default=40)
    ap.add_argument("--out", default=None, help="results path without suffix (.json and .md)")
    args = ap.parse_args(argv)

    sets = jpeg_sets()
    # same answers, truncated inputs included
    for blobs in sets.values():
        for b in blobs:
            for cut in (len(b), len(b) - 2, len(b) // 2, 700):
                d = b[:cut]
                assert has_eoi_forward(d) == preprocess._jpeg_has_eoi(d), cut

    current = preprocess._jpeg_has_eoi
    rows = {}
    for name, blobs in sets.items():
        r = {"images": len(blobs), "mean_kb": round(statistics.fmean(len(b) for b in blobs) / 1024, 1)}
        r["eoi_forward_us"] = per_image_us(blobs, has_eoi_forward, args.repeats, args.passes)
        r["eoi_from_end_us"] = per_image_us(blobs, current, args.repeats, args.passes)
        preprocess._jpeg_has_eoi = has_eoi_forward  # check_encoded as it was
        try:
            r["checks_before_us"] = per_image_us(blobs, host_checks, args.repeats, args.passes)
        finally:
            preprocess._jpeg_has_eoi = current
        r["checks_now_us"] = per_image_us(blobs, host_checks, args.repeats, args.passes)
        r["checks_speedup"] = r["checks_before_us"] / r["checks_now_us"]
        rows[name] = {k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}

    doc = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count()},
        "results": rows,
        "summary": {k: {"checks_before_us": v["checks_before_us"], "checks_now_us": v["checks_now_us"],
                        "speedup": v["checks_speedup"]} for k, v in rows.items()},
    }
    lines = [
        "# Host checks per image before GPU decode (benchmarks/host_checks.py)",
        "",
        f"Command: `{doc['command']}`  ",
        f"Machine: {doc['machine']}; medians of {args.repeats} passes.",
        "",
        "| set | images | mean KB | EOI search forward us | from the end us | all checks before us | now us | speedup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['images']} | {r['mean_kb']} | {r['eoi_forward_us']} | {r['eoi_from_end_us']} | "
                     f"{r['checks_before_us']} | {r['checks_now_us']} | {r['checks_speedup']}x |")
    md = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
