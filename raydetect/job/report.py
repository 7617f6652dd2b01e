"""The job report: ``OUTPUT/_report/report.json`` and ``report.md`` (throughput, per-class counts,
errors), ``throughput.png`` (images/s over time; needs matplotlib, the ``report`` extra — skipped
with a note without it) and a few annotated sample images (boxes drawn with OpenCV)."""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from typing import Any

import cv2
import numpy as np
import pyarrow.dataset as pads

from raydetect.job import output as sh
from raydetect.storage import show, write_bytes_atomic

log = logging.getLogger(__name__)

REPORT_DIR = "_report"
MAX_ERRORS_LISTED = 20


def read_rows(out_fs, out_path: str, columns: list[str]):
    parts = sorted(sh.existing_parts(out_fs, out_path).values())
    if not parts:
        return None
    return pads.dataset(parts, filesystem=out_fs, format="parquet").to_table(columns=columns)


def class_counts(table) -> dict[str, int]:
    counts: Counter[str] = Counter()
    flat = table.column("detections").combine_chunks().flatten()
    if len(flat):
        counts.update(flat.field("class_name").to_pylist())
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def rate_series(timeline: list[tuple[float, int]], bins: int = 30) -> list[tuple[float, float]]:
    """``(bin centre, images/s)`` over equal time bins of the ``(t, images done)`` timeline:
    the images completed in each bin divided by the bin's length."""
    if len(timeline) < 2 or timeline[-1][0] <= 0:
        return []
    end = timeline[-1][0]
    width = max(end / bins, 0.5)
    n_bins = max(1, int(np.ceil(end / width)))
    done = np.zeros(n_bins)
    prev = timeline[0][1]
    for t, n in timeline[1:]:
        done[min(int(t / width), n_bins - 1)] += n - prev
        prev = n
    return [((i + 0.5) * width, float(done[i] / width)) for i in range(n_bins)]


def throughput_png(timeline: list[tuple[float, int]], title: str) -> bytes | None:
    """The throughput plot as PNG bytes, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rates = rate_series(timeline)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ts = [t for t, _ in timeline]
    ns = [n for _, n in timeline]
    ax.step(ts, ns, where="post", color="tab:blue", label="images done")
    ax.set_xlabel("seconds since the job started (includes actor start-up)")
    ax.set_ylabel("images done", color="tab:blue")
    ax2 = ax.twinx()
    if rates:
        ax2.bar([t for t, _ in rates], [r for _, r in rates], width=rates[0][0] * 2 * 0.9, color="tab:orange",
                alpha=0.5, label="images/s")
    ax2.set_ylabel("images/s (per bin)", color="tab:orange")
    ax2.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _color(class_id: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(class_id + 7)
    return tuple(int(c) for c in rng.integers(64, 256, size=3))


def annotate(image: np.ndarray, detections: list[dict[str, Any]]) -> np.ndarray:
    """Draw boxes and ``name score`` labels on a BGR image (a copy)."""
    img = image.copy()
    thick = max(1, round(max(img.shape[:2]) / 400))
    for d in detections:
        color = _color(int(d["class_id"]))
        p1 = (int(round(d["x1"])), int(round(d["y1"])))
        p2 = (int(round(d["x2"])), int(round(d["y2"])))
        cv2.rectangle(img, p1, p2, color, thick)
        score = d["score"]
        label = f"{d['class_name']} {score:.2f}" if score >= 0.01 else f"{d['class_name']} {score:.0e}"
        (w, h), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, thick)
        y = max(p1[1], h + base)
        cv2.rectangle(img, (p1[0], y - h - base), (p1[0] + w, y), color, -1)
        cv2.putText(img, label, (p1[0], y - base), cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thick, (0, 0, 0), thick)
    return img


def write_samples(table, k: int, in_fs, out_fs, report_path: str, uri_prefix: str) -> list[dict[str, Any]]:
    """Annotate the ``k`` images with the most detections (ties: by uri)."""
    if k <= 0:
        return []
    rows = [r for r in table.select(["uri", "detections", "error"]).to_pylist() if r["error"] is None]
    rows.sort(key=lambda r: (-len(r["detections"] or []), r["uri"]))
    out = []
    for n, r in enumerate(rows[:k]):
        path = r["uri"][len(uri_prefix):] if uri_prefix and r["uri"].startswith(uri_prefix) else r["uri"]
        try:
            with in_fs.open(path, "rb") as f:
                data = np.frombuffer(f.read(), np.uint8)
            img = cv2.imdecode(data, cv2.IMREAD_COLOR)
            if img is None:
                continue
            ok, jpg = cv2.imencode(".jpg", annotate(img, r["detections"] or []), [cv2.IMWRITE_JPEG_QUALITY, 85])
        except Exception as e:  # a vanished input must not stop the report
            log.warning("sample %s: %s", r["uri"], e)
            continue
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.rsplit("/", 1)[-1].rsplit(".", 1)[0])[:60]
        name = f"samples/{n:02d}-{stem}.jpg"
        write_bytes_atomic(out_fs, f"{report_path}/{name}", jpg.tobytes())
        out.append({"uri": r["uri"], "file": name, "detections": len(r["detections"] or [])})
    return out


def build_report(summary, timeline, table, samples, plot: str | None, cfg) -> dict[str, Any]:
    errors = []
    if table is not None:
        for r in table.select(["uri", "error"]).to_pylist():
            if r["error"] is not None:
                errors.append(r)
    rates = [r for _, r in rate_series(timeline)]
    return {
        "output": summary.output,
        "input": cfg.input,
        "model": cfg.detector.model,
        "images": summary.images,
        "images_run_now": summary.processed,
        "seconds": round(summary.seconds, 3),
        "images_per_s": round(summary.images_per_s, 3),
        "peak_bin_images_per_s": round(max(rates), 3) if rates else None,
        "shards": summary.shards,
        "shards_skipped": summary.shards_skipped,
        "duplicates_dropped": summary.duplicates_dropped,
        "part_write_s": round(summary.write_s, 3),
        "detections": summary.detections,
        "per_class": class_counts(table) if table is not None else {},
        "errors": summary.errors,
        "unreadable_inputs": summary.unreadable,
        "skipped": summary.skipped,
        "error_examples": errors[:MAX_ERRORS_LISTED],
        "throughput_timeline": [[round(t, 3), n] for t, n in timeline],
        "throughput_plot": plot,
        "samples": samples,
    }


def to_markdown(rep: dict[str, Any]) -> str:
    lines = [
        f"# raydetect job report: {rep['output']}",
        "",
        f"- input: `{rep['input']}`; model: `{rep['model']}`",
        f"- images: {rep['images']} ({rep['images_run_now']} run by this call, "
        f"{rep['shards_skipped']} of {rep['shards']} shards were done before)",
        f"- time: {rep['seconds']} s, {rep['images_per_s']} images/s"
        + (f" (peak bin {rep['peak_bin_images_per_s']} images/s)" if rep["peak_bin_images_per_s"] else ""),
        f"- detections: {rep['detections']}; errors: {rep['errors']}; "
        f"part files written by the driver in {rep['part_write_s']} s",
        f"- unreadable inputs (error rows): {rep['unreadable_inputs']}; skipped (not inputs): "
        + (", ".join(f"{n} {ext}" for ext, n in sorted(rep["skipped"].items())) or "none"),
        "",
        "## Detections per class",
        "",
        "| class | boxes |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v} |" for k, v in rep["per_class"].items()] or ["| (none) | 0 |"]
    lines += ["", "## Throughput", ""]
    lines.append(f"![throughput]({rep['throughput_plot']})" if rep["throughput_plot"] else
                 "(no plot: matplotlib is not installed — `pip install raydetect[report]` — "
                 "or no images were run by this call)")
    if rep["error_examples"]:
        lines += ["", "## Errors", "", "| uri | error |", "|---|---|"]
        lines += [f"| `{show(e['uri'])}` | {show(e['error'])} |" for e in rep["error_examples"]]
    if rep["samples"]:
        lines += ["", "## Samples", ""]
        lines += [f"![{s['uri']}]({s['file']}) — `{s['uri']}`, {s['detections']} boxes" for s in rep["samples"]]
    return "\n".join(lines) + "\n"


def existing_report(cfg, out_fs, out_path: str) -> str | None:
    """URL of the report already in the output, if any."""
    if out_fs.exists(f"{out_path.rstrip('/')}/{REPORT_DIR}/report.json"):
        return f"{cfg.output.rstrip('/')}/{REPORT_DIR}/report.json"
    return None


def write_report(cfg, summary, timeline, in_fs, out_fs, out_path: str, uri_prefix: str) -> str:
    """Write the report under ``OUTPUT/_report/``; return the URL of report.json."""
    report_path = f"{out_path.rstrip('/')}/{REPORT_DIR}"
    out_fs.makedirs(report_path, exist_ok=True)
    table = read_rows(out_fs, out_path, ["uri", "detections", "error"])
    plot = None
    if len(timeline) >= 2:
        png = throughput_png(timeline, f"raydetect: {summary.processed} images, {summary.images_per_s:.1f}/s")
        if png is not None:
            write_bytes_atomic(out_fs, f"{report_path}/throughput.png", png)
            plot = "throughput.png"
        else:
            log.info("matplotlib is not installed: no throughput plot (pip install 'raydetect[report]')")
    samples = (
        write_samples(table, cfg.report_samples, in_fs, out_fs, report_path, uri_prefix) if table is not None else []
    )
    rep = build_report(summary, timeline, table, samples, plot, cfg)
    write_bytes_atomic(out_fs, f"{report_path}/report.json", json.dumps(rep, indent=2).encode())
    write_bytes_atomic(out_fs, f"{report_path}/report.md", to_markdown(rep).encode())
    return f"{cfg.output.rstrip('/')}/{REPORT_DIR}/report.json"
