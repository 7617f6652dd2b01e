"""Video benchmark (issue 5): decode frames/s, and what motion gating saves and loses.

    python benchmarks/video.py [--loops 5] [--repeats 3] [--thresholds 0.5,1,2,3,4,6] \
        [--model ../shared/data/models/yolov5n-coco.onnx --conf 0.25 --classes car,truck,bus]

Input: ``../shared/data/video/traffic-highway-2s.mp4`` (H.264 640x360, 49 frames, fixed camera
over a highway) remuxed ``--loops`` times into one MP4 (packets copied, timestamps shifted:
no re-encoding), read through an fsspec file object as the job does.

Decode: frames/s of PyAV on the CPU (decode only; decode + BGR conversion, i.e. what the
detector receives; and decode by 2-s segments with keyframe seeks), and of NVDEC through
PyNvVideoCodec fed by PyAV's demuxer (the job's path) when :func:`raydetect.video.nvdec.nvdec_availability` allows it (else the reason is
recorded as "nvdec: unavailable (...)"). Medians of ``--repeats``.

NVDEC through NVIDIA's PyNvVideoCodec (when :func:`pynvvideocodec_availability` allows it):
frames/s decode only (NV12 left in GPU memory, one decoder rewound per pass) and decode + RGB
conversion on the GPU + copy to the host; plus a correctness check against PyAV on the same looped
file: frame count, PTS, and mean absolute pixel difference (0-255, RGB) of a few frames.
``--decode-only`` skips the gating part (no detector model needed), e.g. on the GPU machine:
``python benchmarks/video.py --decode-only --loops 20 --out benchmarks/results/video_gpu``.

Gating: every frame of the looped clip goes through the motion gate (64-px grey thumbnail, mean
absolute difference to the last processed frame, forced refresh every ``--refresh`` frames) for
each threshold. *Saved* = skipped / sampled frames. *Recall* = detections of the ungated run
found again in the gated output (a skipped frame's output is its reference frame's detections),
IoU >= 0.5 and same class, matched one to one. Both runs use the same detector; the ungated
detections are computed once per distinct frame (the loops are identical packets, so identical
pixels), and one real gated run through ``detect_segment`` checks that the pipeline's decisions
and detections equal the offline ones. A uniform baseline (the same
number of frames as the gate, evenly spaced) shows whether the gate picks better frames than a
fixed stride.

The model matters for the recall figure only. It is the pretrained COCO YOLOv5n
(``yolov5n-coco.onnx``), and recall counts only the vehicle classes (``--classes``, default
bicycle, car, motorcycle, bus, truck): the objects a traffic camera is about. The ungated run is
the reference, so the recall is gated vs ungated output of the same detector, not an accuracy
against labels (the clip has none). Results before 2026-12 used the defects model, whose boxes
on this clip are not vehicles. Results:
``benchmarks/results/video_cpu.json|md`` (``--out`` to change; ``video_gpu`` on the device).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raydetect.config import DetectorConfig, VideoConfig  # noqa: E402
from raydetect.video.decode import DecodeStats, iter_segment_frames  # noqa: E402
from raydetect.video.detect import detect_segment, plan_video  # noqa: E402
from raydetect.video.gate import MotionGate, grey_thumbnail  # noqa: E402
from raydetect.video.nvdec import nvdec_availability, pynvvideocodec_availability  # noqa: E402
from raydetect.video.probe import open_video, probe_video  # noqa: E402

DATA = Path(os.environ.get("RAYDETECT_TEST_DATA", REPO.parent / "shared" / "data"))
CLIP = DATA / "video" / "traffic-highway-2s.mp4"
#: COCO classes that count for the gating recall on the traffic clip
VEHICLES = ("bicycle", "car", "motorcycle", "bus", "truck")


def loop_clip(src: Path, dst: Path, loops: int) -> int:
    """Remux ``src`` ``loops`` times into ``dst``; returns the PTS span of one loop."""
    with av.open(str(src)) as inp:
        s_in = inp.streams.video[0]
        packets = [p for p in inp.demux(s_in) if p.size > 0]
        ends = [p.pts + (p.duration or 0) for p in packets if p.pts is not None]
        span = max(ends) - min(p.pts for p in packets if p.pts is not None)
        with av.open(str(dst), "w", format="mp4") as out:
            s_out = out.add_stream_from_template(s_in)
            for k in range(loops):
                for p in packets:
                    q = av.Packet(bytes(p))
                    q.pts = None if p.pts is None else p.pts + k * span
                    q.dts = None if p.dts is None else p.dts + k * span
                    q.duration = p.duration
                    q.is_keyframe = p.is_keyframe
                    q.time_base = p.time_base
                    q.stream = s_out
                    out.mux(q)
    return span


# --- decode ---------------------------------------------------------------------------------


def cpu_decode(path: str, segment_s: float | None, bgr: bool) -> tuple[int, float]:
    tasks = plan_video(path, VideoConfig(segment_s=segment_s or 86_400))
    n, t0 = 0, time.perf_counter()
    for task in tasks:
        with open_video(path) as (c, s):
            for fr, _ in iter_segment_frames(c, s, task.segment, DecodeStats()):
                if bgr:
                    fr.bgr()
                n += 1
    return n, time.perf_counter() - t0


def nvdec_decode(path: str, bgr: bool) -> tuple[int, float]:
    """NVDEC through the job's path (PyAV demux, PyNvVideoCodec decode, frames in GPU memory);
    ``bgr``: also convert on the GPU and copy to the host (what a CPU detector would get)."""
    import torch

    task = plan_video(path, VideoConfig(segment_s=86_400))[0]
    n, t0 = 0, time.perf_counter()
    with open_video(path) as (c, s):
        for fr, _ in iter_segment_frames(c, s, task.segment, DecodeStats(), decoder="nvdec"):
            if bgr:
                fr.bgr()
            n += 1
    torch.cuda.synchronize()
    return n, time.perf_counter() - t0


def pynvvideocodec_decode(path: str, rgb_to_host: bool, decoder) -> tuple[int, float]:
    from raydetect.video.nvdec import cuda_synchronize, iter_file_frames_pynvvideocodec

    n, t0 = 0, time.perf_counter()
    for _ in iter_file_frames_pynvvideocodec(path, rgb_to_host=rgb_to_host, decoder=decoder):
        n += 1
    cuda_synchronize()
    return n, time.perf_counter() - t0


def pynvvideocodec_vs_cpu(path: str, compare: int = 5) -> dict:
    """PyNvVideoCodec vs PyAV on ``path``: frame count, PTS, mean |difference| of ``compare`` frames."""
    from raydetect.video.nvdec import iter_file_frames_pynvvideocodec

    cpu_pts, cpu_rgb = [], {}
    task = plan_video(path, VideoConfig(segment_s=86_400))[0]
    with open_video(path) as (c, s):
        for fr, _ in iter_segment_frames(c, s, task.segment, DecodeStats()):
            cpu_pts.append(fr.pts)
            cpu_rgb[fr.pts] = None
    picks = set(np.linspace(0, len(cpu_pts) - 1, compare).round().astype(int).tolist())
    with open_video(path) as (c, s):
        for i, (fr, _) in enumerate(iter_segment_frames(c, s, task.segment, DecodeStats())):
            if i in picks:
                cpu_rgb[fr.pts] = fr.bgr()[..., ::-1]
    gpu_pts, gpu_rgb = [], {}
    for i, (pts, rgb) in enumerate(iter_file_frames_pynvvideocodec(path, rgb_to_host=True)):
        gpu_pts.append(pts)
        if i in picks:
            gpu_rgb[i] = (pts, rgb)
    same_pts = gpu_pts == cpu_pts
    diffs = []
    for i in sorted(picks):
        if i not in gpu_rgb:
            continue
        pts, rgb = gpu_rgb[i]
        ref = cpu_rgb.get(pts) if same_pts else cpu_rgb.get(cpu_pts[i])  # by PTS, else by position
        if ref is None or rgb.shape != ref.shape:
            diffs.append({"index": i, "pts": pts, "error": f"shape {rgb.shape} vs {None if ref is None else ref.shape}"})
            continue
        d = np.abs(rgb.astype(np.int16) - ref.astype(np.int16))
        diffs.append({"index": i, "pts": pts, "mean_abs_diff": float(d.mean()), "max_abs_diff": int(d.max()),
                      "fraction_over_8": float((d > 8).mean())})
    mads = [d["mean_abs_diff"] for d in diffs if "mean_abs_diff" in d]
    return {
        "frames_cpu": len(cpu_pts), "frames_nvdec": len(gpu_pts), "same_frame_count": len(cpu_pts) == len(gpu_pts),
        "same_pts": same_pts, "pts_cpu_first": cpu_pts[:3], "pts_nvdec_first": gpu_pts[:3],
        "compared_frames": diffs, "mean_abs_diff_rgb": statistics.mean(mads) if mads else None,
        "matched_by": "pts" if same_pts else "position",
    }


def median_fps(fn, repeats: int) -> dict:
    runs = [fn() for _ in range(repeats)]
    fps = [n / s for n, s in runs]
    return {"frames": runs[0][0], "fps_median": statistics.median(fps), "fps_runs": fps}


# --- gating ---------------------------------------------------------------------------------


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1 = np.maximum(a[:, None, 0], b[None, :, 0])
    y1 = np.maximum(a[:, None, 1], b[None, :, 1])
    x2 = np.minimum(a[:, None, 2], b[None, :, 2])
    y2 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda z: (z[:, 2] - z[:, 0]) * (z[:, 3] - z[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def matched(truth: list, found: list, thr: float = 0.5) -> int:
    """Detections of ``truth`` matched one to one by ``found`` (same class, IoU >= thr)."""
    if not truth or not found:
        return 0
    t = np.array([[d.x1, d.y1, d.x2, d.y2] for d in truth])
    f = np.array([[d.x1, d.y1, d.x2, d.y2] for d in found])
    ious = iou(t, f)
    same = np.array([[a.class_id == b.class_id for b in found] for a in truth])
    ious = np.where(same, ious, 0.0)
    used: set[int] = set()
    hits = 0
    for i in np.argsort([-d.score for d in truth]):
        for j in np.argsort(-ious[i]):
            if ious[i, j] < thr:
                break
            if j not in used:
                used.add(int(j))
                hits += 1
                break
    return hits


def recall_of(refs: list[int], dets: list[list]) -> dict:
    """``refs[i]``: the frame whose detections stand for frame ``i`` (``i`` itself if processed)."""
    total = hits = total_sk = hits_sk = 0
    for i, r in enumerate(refs):
        n = len(dets[i])
        h = n if r == i else matched(dets[i], dets[r])
        total += n
        hits += h
        if r != i:
            total_sk += n
            hits_sk += h
    return {
        "recall": hits / total if total else 1.0,
        "recall_on_skipped": hits_sk / total_sk if total_sk else None,
        "detections_ungated": total,
        "detections_lost": total - hits,
    }


def uniform_refs(n: int, processed: int) -> list[int]:
    """The baseline: ``processed`` frames evenly spaced over ``n``, each frame carried by the last."""
    chosen = sorted({(k * n) // processed for k in range(processed)})
    refs, j = [], 0
    for i in range(n):
        while j + 1 < len(chosen) and chosen[j + 1] <= i:
            j += 1
        refs.append(chosen[j])
    return refs


def gate_refs(thumbs: list[np.ndarray], threshold: float, refresh: int) -> tuple[list[int], list]:
    gate = MotionGate(threshold, refresh)
    refs, decisions, last = [], [], 0
    for i, th in enumerate(thumbs):
        d = gate.decide(th)
        decisions.append(d)
        if d.process:
            last = i
        refs.append(last)
    return refs, decisions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loops", type=int, default=5, help="copies of the 2-s clip (default 5 = 10 s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=str(DATA / "models" / "yolov5n-coco.onnx"),
                    help="detector for the recall figure (default: the pretrained COCO YOLOv5n)")
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--classes", default=",".join(VEHICLES),
                    help="class names that count for recall (comma-separated; empty: all classes)")
    ap.add_argument("--thresholds", default="0.5,1,1.5,2,3,4,6")
    ap.add_argument("--refresh", type=int, default=25)
    ap.add_argument("--check-threshold", type=float, default=2.0,
                    help="threshold of the real gated run that validates the offline sweep")
    ap.add_argument("--decode-only", action="store_true", help="decode frames/s only (no detector, no gating)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "video_cpu"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="raydetect-video-bench-"))
    looped = tmp / f"traffic-x{args.loops}.mp4"
    span = loop_clip(CLIP, looped, args.loops)
    info = probe_video(str(looped))
    path = str(looped)
    print(f"clip: {looped.name} {info.codec} {info.width}x{info.height} {float(info.fps):.3f} fps "
          f"{info.duration_s:.2f} s", flush=True)

    # decode (one untimed pass first: file cache, decoder initialisation)
    cpu_decode(path, None, True)
    decode = {
        "cpu_pyav_decode_only": median_fps(lambda: cpu_decode(path, None, False), args.repeats),
        "cpu_pyav_decode_bgr": median_fps(lambda: cpu_decode(path, None, True), args.repeats),
        "cpu_pyav_decode_bgr_2s_segments_worst_case_seeks": median_fps(lambda: cpu_decode(path, 2.0, True), args.repeats),
    }
    ok, reason = nvdec_availability()
    if ok:
        decode["nvdec_pyav_demux_decode_only"] = median_fps(lambda: nvdec_decode(path, False), args.repeats)
        decode["nvdec_pyav_demux_decode_bgr_to_host"] = median_fps(lambda: nvdec_decode(path, True), args.repeats)
        decode["nvdec"] = f"available ({reason})"
    else:
        decode["nvdec"] = f"unavailable ({reason})"
    ok, reason = pynvvideocodec_availability()
    decode["nvdec_pynvvideocodec"] = f"{'available' if ok else 'unavailable'} ({reason})"
    comparison = None
    if ok:
        from raydetect.video.nvdec import open_pynvvideocodec

        for name, rgb in (("decode_only", False), ("decode_rgb_to_host", True)):
            try:
                dec = open_pynvvideocodec(path, rgb=rgb)
                pynvvideocodec_decode(path, rgb, dec)  # untimed pass: session start, CUDA/torch init
                decode[f"nvdec_pynvvideocodec_{name}"] = median_fps(lambda: pynvvideocodec_decode(path, rgb, dec),  # noqa: B023
                                                                    args.repeats)
                del dec
            except Exception as e:
                decode[f"nvdec_pynvvideocodec_{name}"] = f"failed ({type(e).__name__}: {e})"
        try:
            comparison = pynvvideocodec_vs_cpu(path)
        except Exception as e:
            comparison = {"error": f"{type(e).__name__}: {e}"}
        print(f"pynvvideocodec vs cpu: {comparison}", flush=True)
    for k, v in decode.items():
        print(f"decode {k}: {v if isinstance(v, str) else round(v['fps_median'], 1)}", flush=True)

    if args.decode_only:
        result = {
            "command": "python benchmarks/video.py " + " ".join(sys.argv[1:]),
            "machine": machine(),
            "clip": {"source": str(CLIP.relative_to(DATA.parent)), "loops": args.loops, "frames": decode[
                "cpu_pyav_decode_only"]["frames"], "codec": info.codec, "width": info.width, "height": info.height,
                "fps": float(info.fps), "duration_s": info.duration_s},
            "decode": decode,
            "nvdec_vs_cpu": comparison,
        }
        write(result, Path(args.out))
        shutil.rmtree(tmp, ignore_errors=True)
        return

    # gating: thumbnails of every frame, ungated detections of the distinct frames
    from raydetect.detector import Detector

    detector = Detector(DetectorConfig(model=args.model, conf=args.conf, batch_size=8))
    # (the source MP4's edit list hides its first frame; the remuxed loops show all 50)
    thumbs, first_loop, pts_in_loop, all_pts = [], {}, [], []
    with open_video(path) as (c, s):
        for fr, _ in iter_segment_frames(c, s, plan_video(path, VideoConfig(segment_s=86_400))[0].segment,
                                         DecodeStats()):
            thumbs.append(grey_thumbnail(fr.grey(), 64))
            key = (fr.pts - info.origin) % span
            pts_in_loop.append(key)
            all_pts.append(fr.pts)
            if fr.pts - info.origin < span:
                first_loop[key] = fr.bgr()
    keys = sorted(first_loop)
    t0 = time.perf_counter()
    classes = {c for c in args.classes.split(",") if c}

    def kept(found: list) -> list:
        """The detections that count for recall (``--classes``)."""
        return [d for d in found if not classes or d.class_name in classes]

    unique = dict(zip(keys, (kept(r.detections) for r in detector.detect([first_loop[k] for k in keys])),
                      strict=True))
    infer_ms = (time.perf_counter() - t0) / len(keys) * 1e3
    dets = [unique[k] for k in pts_in_loop]
    diffs = [float(np.abs(thumbs[i] - thumbs[i - 1]).mean()) for i in range(1, len(thumbs))]

    sweep = []
    for thr in [float(x) for x in args.thresholds.split(",")]:
        refs, _ = gate_refs(thumbs, thr, args.refresh)
        processed = sum(1 for i, r in enumerate(refs) if r == i)
        uniform = uniform_refs(len(refs), processed)
        sweep.append({
            "threshold": thr,
            "frames": len(refs),
            "processed": processed,
            "saved_fraction": 1 - processed / len(refs),
            **recall_of(refs, dets),
            "uniform_recall": recall_of(uniform, dets)["recall"],
        })
        r = sweep[-1]
        print(f"gate thr {thr}: saved {r['saved_fraction']:.1%}, recall {r['recall']:.3f} "
              f"(same number of evenly spaced frames: recall {r['uniform_recall']:.3f})", flush=True)

    # one real run through the pipeline validates the offline figures
    video = VideoConfig(segment_s=86_400, gate=True, gate_threshold=args.check_threshold, gate_refresh=args.refresh)
    task = plan_video(path, video)[0]
    t0 = time.perf_counter()
    outcome = detect_segment(detector, task, video)
    gated_s = time.perf_counter() - t0
    rows = [r for r in outcome.rows if r.frame is not None]
    refs, _ = gate_refs(thumbs, args.check_threshold, args.refresh)
    pts_of_index = {r.frame: r.pts for r in rows}  # frame indices come from PTS and may have gaps
    position = {p: i for i, p in enumerate(all_pts)}
    pipeline_refs = [r.pts if not r.skipped else pts_of_index[r.ref_frame] for r in rows]
    check = {
        "threshold": args.check_threshold,
        "same_decisions_as_offline": pipeline_refs == [all_pts[i] for i in refs],
        "same_detections_on_processed_frames": all(
            kept(r.detections) == dets[position[r.pts]] for r in rows if not r.skipped
        ),
        "processed": outcome.stats["frames_processed"],
        "skipped": outcome.stats["frames_skipped"],
        "seconds": gated_s,
    }
    print(f"pipeline check: {check}", flush=True)

    result = {
        "command": "python benchmarks/video.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "clip": {"source": str(CLIP.relative_to(DATA.parent)), "loops": args.loops, "frames": len(thumbs),
                 "codec": info.codec, "width": info.width, "height": info.height, "fps": float(info.fps),
                 "duration_s": info.duration_s},
        "decode": decode,
        "gating": {
            "model": Path(args.model).name, "conf": args.conf, "refresh": args.refresh, "thumbnail_width": 64,
            "classes": sorted(classes) or "all",
            "infer_ms_per_frame": infer_ms,
            "consecutive_frame_diff": {"min": min(diffs), "median": statistics.median(diffs), "max": max(diffs)},
            "sweep": sweep, "pipeline_check": check,
        },
    }
    write(result, Path(args.out))
    shutil.rmtree(tmp, ignore_errors=True)


def machine() -> dict:
    m = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
         "pyav": av.__version__}
    try:
        import subprocess

        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        if gpu:
            m["gpu"] = gpu
    except Exception:
        pass
    return m


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(f"wrote {out.with_suffix('.json')} and .md")


def markdown(r: dict) -> str:
    c, g = r["clip"], r.get("gating")
    lines = [
        "# Video benchmark",
        "",
        f"`{r['command']}` on {r['machine']['platform']}, {r['machine']['cpus']} CPUs, PyAV {r['machine']['pyav']}"
        + (f", GPU {r['machine']['gpu']}." if r["machine"].get("gpu") else "."),
        f"Clip: `{c['source']}` looped {c['loops']}x = {c['frames']} frames, {c['codec']} {c['width']}x{c['height']} "
        f"at {c['fps']:.3f} fps, {c['duration_s']:.2f} s.",
        "",
        "## Decode (frames/s, median)",
        "",
        "| decoder | frames/s |",
        "|---|---|",
    ]
    for k, v in r["decode"].items():
        value = v if isinstance(v, str) else f"{v['fps_median']:.1f}"
        lines.append(f"| {k} | {value} |")
    cmp = r.get("nvdec_vs_cpu")
    if cmp and "error" in cmp:
        lines += ["", f"PyNvVideoCodec vs PyAV check failed: {cmp['error']}"]
    elif cmp:
        mad = cmp["mean_abs_diff_rgb"]
        lines += [
            "",
            "## NVDEC (PyNvVideoCodec) vs CPU (PyAV), same file",
            "",
            f"Frames: NVDEC {cmp['frames_nvdec']}, CPU {cmp['frames_cpu']} (equal: {cmp['same_frame_count']}); "
            f"same PTS: {cmp['same_pts']}. Mean absolute RGB difference (0-255) over "
            f"{len(cmp['compared_frames'])} frames matched by {cmp['matched_by']}: "
            + ("-" if mad is None else f"{mad:.2f}") + ".",
            "",
            "| frame | pts | mean abs diff | max abs diff | pixels differing > 8 |",
            "|---|---|---|---|---|",
        ]
        for d in cmp["compared_frames"]:
            if "error" in d:
                lines.append(f"| {d['index']} | {d['pts']} | {d['error']} | | |")
            else:
                lines.append(f"| {d['index']} | {d['pts']} | {d['mean_abs_diff']:.2f} | {d['max_abs_diff']} | "
                             f"{d['fraction_over_8']:.2%} |")
    if g is None:
        return "\n".join(lines)
    d = g["consecutive_frame_diff"]
    lines += [
        "",
        f"## Motion gating ({g['model']}, conf {g['conf']}, refresh {g['refresh']}, {g['thumbnail_width']}-px thumbnail)",
        "",
        f"Recall counts the classes {', '.join(g['classes']) if isinstance(g.get('classes'), list) else 'all'}.",
        "",
        f"Grey difference between consecutive frames: min {d['min']:.2f}, median {d['median']:.2f}, "
        f"max {d['max']:.2f} (0-255). Inference: {g['infer_ms_per_frame']:.0f} ms/frame here.",
        "",
        "| threshold | inference saved | recall (all frames) | recall (skipped frames) | detections lost | "
        "recall of as many evenly spaced frames |",
        "|---|---|---|---|---|---|",
    ]
    for s in g["sweep"]:
        rs = "-" if s["recall_on_skipped"] is None else f"{s['recall_on_skipped']:.3f}"
        lines.append(
            f"| {s['threshold']} | {s['saved_fraction']:.1%} | {s['recall']:.3f} | {rs} | "
            f"{s['detections_lost']} of {s['detections_ungated']} | {s['uniform_recall']:.3f} |"
        )
    ch = g["pipeline_check"]
    lines += [
        "",
        f"Pipeline check at threshold {ch['threshold']}: `detect_segment` processed {ch['processed']} and skipped "
        f"{ch['skipped']} frames in {ch['seconds']:.1f} s; same decisions as the offline sweep: "
        f"{ch['same_decisions_as_offline']}; same detections on processed frames: "
        f"{ch['same_detections_on_processed_frames']}.",
    ]
    return "\n".join(lines)

# --- NVDEC in the job at 1080p (issue 15) -----------------------------------------------------
#
#   python benchmarks/video.py --gpu clips,decode,inproc,job --minutes 10 --files 4 \
#       --model MODEL --out benchmarks/results/video_gpu
#
# clips: the traffic clip upscaled to 1920x1080, re-encoded with PyAV at 30 fps (libx264 /
# libx265, B-frames on) and remuxed in loops to ``--minutes`` in total over ``--files`` files per
# codec. decode: decode-only frames/s of one NVDEC session (the job's path: PyAV demux, NVDEC
# decode to an NV12 device tensor) and of N sessions in N threads of one process, and PyAV on
# the CPU alike. inproc: decode + detect in one process without Ray
# (:func:`raydetect.video.detect.detect_segments`). job: the Ray Data video job
# (:func:`raydetect.video.pipeline.run_video_job`) with NVDEC and with the CPU decoder on the same
# machine and detector: frames/s over the whole job (actor start included) and steady (first
# segment start to last segment end), and 1080p30 streams = steady frames/s / 30.
# Each step writes ``<out>.<step>.json``; ``--merge`` folds them into ``<out>.json|md``.

CODECS = {"h264": ("libx264", {"preset": "veryfast", "bf": "3"}),
          "hevc": ("libx265", {"preset": "superfast", "x265-params": "bframes=3:log-level=error"})}


def make_clip(src: Path, dst: Path, codec: str, width: int = 1920, height: int = 1080, rate: int = 30) -> dict:
    """``src`` upscaled to ``width`` x ``height`` and re-encoded with PyAV (``codec``: h264 or
    hevc, B-frames on) at ``rate`` frames/s."""
    from fractions import Fraction

    enc, opts = CODECS[codec]
    n = 0
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4") as out:
        s = out.add_stream(enc, rate=rate, options=dict(opts))
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for fr in inp.decode(video=0):
            img = fr.reformat(width=width, height=height, format="yuv420p", interpolation="BICUBIC")
            img.pts, img.time_base = n, Fraction(1, rate)
            for p in s.encode(img):
                out.mux(p)
            n += 1
        for p in s.encode():
            out.mux(p)
    return {"codec": codec, "encoder": enc, "options": opts, "frames": n, "bytes": dst.stat().st_size}


def make_gpu_clips(work: Path, codecs: list[str], minutes: float, files: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for codec in codecs:
        one = work / f"traffic-{codec}-1080p30-once.mp4"
        info = make_clip(CLIP, one, codec)
        loops = max(1, -(-int(minutes * 60 * 30) // (info["frames"] * files)))
        paths = []
        for i in range(files):
            dst = work / f"traffic-{codec}-1080p30-{i}.mp4"
            loop_clip(one, dst, loops)
            paths.append(str(dst))
        probe = probe_video(paths[0])
        out[codec] = {**info, "loops_per_file": loops, "files": paths, "duration_s_per_file": probe.duration_s,
                      "total_minutes": probe.duration_s * files / 60, "width": probe.width, "height": probe.height,
                      "has_b_frames": _has_b_frames(one)}
    return out


def _has_b_frames(path: Path) -> bool:
    """A packet whose PTS is below an earlier packet's: pictures reordered, i.e. B-frames."""
    with av.open(str(path)) as c:
        pts = [p.pts for p in c.demux(video=0) if p.pts is not None]
    return any(b < a for a, b in zip(pts, pts[1:], strict=False))


def decode_sessions(paths: list[str], decoder: str, sessions: int, rgb: bool = False, limit: int = 1500) -> dict:
    """Frames/s of ``sessions`` threads, each decoding the first ``limit`` frames of a file
    (``paths`` round robin)."""
    import threading

    counts = [0] * sessions

    def work(k: int) -> None:
        path = paths[k % len(paths)]
        task = plan_video(path, VideoConfig(segment_s=86_400))[0]
        with open_video(path) as (c, s):
            for fr, _ in iter_segment_frames(c, s, task.segment, DecodeStats(), decoder=decoder):
                if rgb:
                    fr.rgb() if decoder == "nvdec" else fr.bgr()
                counts[k] += 1
                if counts[k] >= limit:
                    break

    threads = [threading.Thread(target=work, args=(k,)) for k in range(sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if decoder == "nvdec":
        from raydetect.video.nvdec import cuda_synchronize

        cuda_synchronize()
    dt = time.perf_counter() - t0
    return {"sessions": sessions, "frames": sum(counts), "seconds": dt, "fps": sum(counts) / dt}


def detector_config(args) -> DetectorConfig:
    return DetectorConfig(model=args.model, engine=args.engine, precision=args.precision,
                          batch_size=args.batch, conf=args.conf)


def inproc_job(det, paths: list[str], decoder: str, sessions: int, args) -> dict:
    """Decode + detect without Ray: all segments of ``paths``, ``sessions`` at a time."""
    from raydetect.video.detect import detect_segments

    video = VideoConfig(segment_s=args.segment_s, decoder=decoder, sessions=sessions)
    tasks = [t for p in paths for t in plan_video(p, video)]
    t0 = time.perf_counter()
    frames = processed = dets = 0
    used = set()
    for i in range(0, len(tasks), sessions):
        for o in detect_segments(det, tasks[i : i + sessions], video, decoder=decoder):
            frames += o.stats["frames_decoded"]
            processed += o.stats["frames_processed"]
            dets += o.stats["detections"]
            used.add((o.stats["decoder"], o.stats["decoder_reason"]))
    dt = time.perf_counter() - t0
    return {"decoder": decoder, "sessions": sessions, "segments": len(tasks), "frames": frames,
            "processed": processed, "detections": dets, "seconds": dt, "fps": frames / dt,
            "decoders_used": sorted(map(str, used)), "engine": det.engine.name, "stages": det.info()["stages"]}


def ray_job(paths: list[str], decoder: str, actors: int, sessions: int, args, tag: str) -> dict:
    """The Ray Data video job over ``paths`` (Ray initialised by the caller)."""
    import fsspec

    from raydetect.config import JobConfig
    from raydetect.video.pipeline import run_video_job

    out = Path(tempfile.mkdtemp(prefix=f"vjob-{tag}-"))
    cfg = JobConfig(input=str(Path(paths[0]).parent), output=str(out), detector=detector_config(args),
                    concurrency=actors, min_actors=actors, num_gpus=round(1.0 / actors, 4),
                    num_cpus=max(0.5, ((os.cpu_count() or 2) - 2) / actors), progress=False, report=False,
                    video=VideoConfig(segment_s=args.segment_s, decoder=decoder, sessions=sessions))
    t0 = time.perf_counter()
    summ = run_video_job(cfg, fsspec.filesystem("file"), paths)
    wall = time.perf_counter() - t0
    rows = summ.segment_rows
    span = max(r["finished"] for r in rows) - min(r["started"] for r in rows)
    steady = summ.frames_decoded / span if span > 0 else None
    shutil.rmtree(out, ignore_errors=True)
    return {"tag": tag, "decoder": decoder, "actors": actors, "gpu_per_actor": cfg.num_gpus, "sessions": sessions,
            "segments": summ.segments, "frames": summ.frames_decoded, "processed": summ.frames_processed,
            "detections": summ.detections, "errors": summ.errors, "seconds_total": wall, "fps_total": summ.frames_decoded / wall,
            "seconds_steady": span, "fps_steady": steady, "streams_1080p30": None if steady is None else steady / 30,
            "decoders_used": sorted({f"{r['decoder']}: {r['decoder_reason']}" for r in rows}),
            "workers": len({r["worker"] for r in rows}),
            "segments_per_worker": sorted(collections.Counter(r["worker"] for r in rows).values()),
            # each segment's [worker, start, end] in seconds from the first start: who ran what, when
            "timeline": _timeline(rows)}


def _timeline(rows: list[dict]) -> list[list]:
    t0 = min(r["started"] for r in rows)
    workers = {w: k for k, w in enumerate(sorted({r["worker"] for r in rows}))}
    return sorted([workers[r["worker"]], round(r["started"] - t0, 2), round(r["finished"] - t0, 2)] for r in rows)


def gpu_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="NVDEC in the video job (1080p H.264/HEVC)")
    ap.add_argument("--gpu", default="clips,decode,inproc,job", help="steps: clips,decode,inproc,job")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "raydetect-video-gpu"))
    ap.add_argument("--codecs", default="h264,hevc")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--sessions", default="1,2,4,8")
    ap.add_argument("--model", default=str(DATA / "models" / "yolov5n-coco.onnx"))
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--precision", default="fp16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--conf", type=float, default=0.25)
    ap.add_argument("--segment-s", type=float, default=60.0)
    ap.add_argument("--decode-frames", type=int, default=1000, help="frames per NVDEC session in the decode step")
    ap.add_argument("--inproc", default="nvdec:h264:4,nvdec:h264:8,nvdec:hevc:8,cpu:h264:16",
                    help="decoder:codec:sessions,... of the in-process step")
    ap.add_argument("--inproc-files", type=int, default=2)
    ap.add_argument("--tag-suffix", default="", help="appended to each job's tag (e.g. _base: other code, "
                    "same host; --merge leaves such jobs out of the summary)")
    ap.add_argument("--jobs", default="nvdec:h264:1:4,nvdec:h264:2:4,nvdec:hevc:2:4,cpu:h264:4:4",
                    help="decoder:codec:actors:sessions[:files],... (files: the first N clips of the codec)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "video_gpu"))
    ap.add_argument("--merge", nargs="*", help="step JSON files to fold into --out (no runs)")
    ap.add_argument("--summary-skip", default="_base", help="with --merge: jobs whose tag ends with one "
                    "of these (comma-separated) are listed but left out of the summary (other code)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.merge is not None:
        return merge_gpu(args.merge, out, tuple(x for x in args.summary_skip.split(",") if x))
    steps = args.gpu.split(",")
    work = Path(args.work)
    codecs = args.codecs.split(",")
    clips_json = work / "clips.json"
    res: dict = {"command": "python benchmarks/video.py " + " ".join(argv), "machine": machine()}
    step_out = out.parent / f"{out.name}.{'_'.join(steps)}.json"
    step_out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every step: a run cut short keeps what it measured
        step_out.write_text(json.dumps(res, indent=2, default=str) + "\n")

    if "clips" in steps:
        t0 = time.perf_counter()
        res["clips"] = make_gpu_clips(work, codecs, args.minutes, args.files)
        res["clips_seconds"] = time.perf_counter() - t0
        clips_json.write_text(json.dumps(res["clips"]))
        save()
        print("clips:", {c: (v["frames"], v["loops_per_file"], round(v["total_minutes"], 2), v["has_b_frames"])
                         for c, v in res["clips"].items()}, flush=True)
    clips = json.loads(clips_json.read_text())
    print("nvdec:", nvdec_availability(), flush=True)
    if "decode" in steps:
        dec: dict = {}
        for codec in codecs:
            paths = clips[codec]["files"]
            for n in [int(x) for x in args.sessions.split(",")]:
                dec[f"nvdec_{codec}_{n}"] = decode_sessions(paths, "nvdec", n, limit=args.decode_frames)
                print(codec, "nvdec", n, round(dec[f"nvdec_{codec}_{n}"]["fps"]), flush=True)
            dec[f"nvdec_rgb_{codec}_4"] = decode_sessions(paths, "nvdec", 4, rgb=True, limit=args.decode_frames)
            for n in (1, 16):  # CPU decode at 1080p is slow: fewer frames
                dec[f"cpu_{codec}_{n}"] = decode_sessions(paths, "cpu", n, limit=200 if n == 1 else 100)
                print(codec, "cpu", n, round(dec[f"cpu_{codec}_{n}"]["fps"]), flush=True)
            res["decode"] = dec
            save()
    if "inproc" in steps:
        from raydetect.detector import Detector

        det = Detector(detector_config(args))
        res["inproc"] = {}
        for spec in args.inproc.split(","):
            decoder, codec, sessions = spec.split(":")
            try:
                r = inproc_job(det, clips[codec]["files"][: args.inproc_files], decoder, int(sessions), args)
            except Exception as e:
                r = {"decoder": decoder, "error": f"{type(e).__name__}: {e}"}
            r["codec"] = codec
            res["inproc"][f"{decoder}_{codec}_{sessions}"] = r
            print("inproc", codec, decoder, sessions, round(r.get("fps", 0)), r.get("decoders_used"), r.get("error"),
                  flush=True)
            save()
    if "job" in steps:
        import ray

        from raydetect.detector import Detector

        # Build the engine once here first, so that every job's actors start from a warm compiled-
        # engine cache (a cold cache made the first job's actors ready tens of seconds apart, and
        # the ready ones took the segments of the others)
        t0 = time.perf_counter()
        warm = Detector(detector_config(args))
        res["engine_warmup"] = {"seconds": time.perf_counter() - t0, "engine": warm.engine.name,
                                "stages": warm.info()["stages"]}
        del warm
        print("engine warm-up:", res["engine_warmup"], flush=True)
        ray.init(num_cpus=os.cpu_count(), num_gpus=1, include_dashboard=False, log_to_driver=False)
        res["job"] = {}
        for spec in args.jobs.split(","):
            decoder, codec, actors, sessions, *files = spec.split(":")
            tag = f"{decoder}_{codec}_{actors}x{sessions}" + (f"_{files[0]}files" if files else "") + args.tag_suffix
            try:
                paths = clips[codec]["files"][: int(files[0])] if files else clips[codec]["files"]
                r = ray_job(paths, decoder, int(actors), int(sessions), args, tag)
            except Exception as e:
                r = {"tag": tag, "error": f"{type(e).__name__}: {e}"}
            res["job"][tag] = r
            print("job", tag, {k: r.get(k) for k in ("fps_total", "fps_steady", "streams_1080p30", "decoders_used",
                                                     "segments_per_worker", "error")}, flush=True)
            save()
        ray.shutdown()
    save()
    print("wrote", step_out)


def merge_gpu(files: list[str], out: Path, skip: tuple[str, ...] = ("_base",)) -> None:
    """Fold step results into ``out.json|md`` with the ``summary`` object of issue 15."""
    r: dict = {"runs": []}
    for f in files:
        d = json.loads(Path(f).read_text())
        r["runs"].append({"command": d.get("command"), "machine": d.get("machine")})
        for k in ("clips", "decode", "inproc", "job"):
            if k in d:
                r.setdefault(k, {}).update(d[k])
    jobs = r.get("job", {})
    dec = r.get("decode", {})
    summary = []
    mine = [j for j in jobs.values() if not j.get("tag", "").endswith(skip)]  # e.g. _base: a comparison's other code
    for codec in ("h264", "hevc"):
        nv = [j for j in mine if j.get("decoder") == "nvdec" and f"_{codec}_" in j["tag"] and j.get("fps_steady")]
        cpu = [j for j in mine if j.get("decoder") == "cpu" and f"_{codec}_" in j["tag"] and j.get("fps_steady")]
        kind = "ray_data_job"
        if not nv:  # no Ray job ran: the in-process decode + detect (the actor's code without Ray)
            kind = "in_process_no_ray"
            ip = r.get("inproc", {})
            nv = [{**j, "tag": k, "fps_steady": j["fps"], "fps_total": j["fps"], "streams_1080p30": j["fps"] / 30}
                  for k, j in ip.items() if j.get("codec") == codec and k.startswith("nvdec") and j.get("fps")
                  and all(d.startswith("('nvdec'") for d in j.get("decoders_used", []))]
            cpu = [{**j, "tag": k, "fps_steady": j["fps"]} for k, j in ip.items()
                   if k.startswith("cpu") and j.get("fps") and j.get("codec") == codec]
        if not nv:
            continue
        best = max(nv, key=lambda j: j["fps_steady"])
        one = dec.get(f"nvdec_{codec}_1", {}).get("fps")
        many = max((v["fps"] for k, v in dec.items() if k.startswith(f"nvdec_{codec}_")), default=None)
        cpu_best = max((j["fps_steady"] for j in cpu), default=None)
        summary.append({
            "gpu": (r["runs"][0]["machine"] or {}).get("gpu"), "codec": codec, "resolution": "1920x1080",
            "decode_only_fps": one, "decode_only_fps_best_sessions": many,
            "job_fps": best["fps_steady"], "job_fps_total": best["fps_total"], "job_run": best["tag"],
            "job_kind": kind, "streams_1080p30": best["streams_1080p30"],
            "cpu_job_fps": cpu_best, "vs_cpu_job": best["fps_steady"] / cpu_best if cpu_best else None,
        })
    r["summary"] = summary[0] if len(summary) == 1 else {"h264": summary[0], "hevc": summary[1]} if summary else {}
    r["summaries"] = summary
    out.with_suffix(".json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown_gpu(r) + "\n")
    print(f"wrote {out.with_suffix('.json')} and .md")


def markdown_gpu(r: dict) -> str:
    lines = ["# NVDEC in the video job (1080p, issue 15)", ""]
    for run in r["runs"]:
        m = run["machine"] or {}
        lines.append(f"- `{run['command']}` on {m.get('gpu')}, {m.get('cpus')} CPUs, PyAV {m.get('pyav')}")
    if not r["summaries"]:
        lines += ["", "## Summary", "", "No decode + detect run completed: no summary."]
    else:
        lines += ["", "## Summary", "", "| " + " | ".join(r["summaries"][0]) + " |"]
        lines.append("|" + "---|" * len(r["summaries"][0]))
        for s in r["summaries"]:
            lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in s.values()) + " |")
    if r.get("clips"):
        lines += ["", "## Clips", "", "| codec | encoder | frames once | loops/file | files | minutes | B-frames |", "|---|---|---|---|---|---|---|"]
        for c, v in r["clips"].items():
            lines.append(f"| {c} | {v['encoder']} {v['options']} | {v['frames']} | {v['loops_per_file']} | "
                         f"{len(v['files'])} | {v['total_minutes']:.1f} | {v['has_b_frames']} |")
    if r.get("decode"):
        lines += ["", "## Decode only (frames/s; N sessions = N threads of one process)", "",
                  "| run | sessions | frames | frames/s |", "|---|---|---|---|"]
        for k, v in r["decode"].items():
            lines.append(f"| {k} | {v['sessions']} | {v['frames']} | {v['fps']:.0f} |")
    if r.get("inproc"):
        lines += ["", "## Decode + detect in one process, no Ray (frames/s; sessions = segments at once)", "",
                  "| run | segments | frames | frames/s | 1080p30 streams | decoders |", "|---|---|---|---|---|---|"]
        for k, v in r["inproc"].items():
            if "error" in v:
                lines.append(f"| {k} | | | {v['error']} | | |")
                continue
            lines.append(f"| {k} | {v['segments']} | {v['frames']} | {v['fps']:.0f} | {v['fps'] / 30:.1f} | "
                         f"{'; '.join(v['decoders_used'])} |")
    if r.get("job"):
        lines += ["", "## Ray Data video job (frames/s)", "",
                  "| run | actors x sessions | frames | total (incl. actor start) | steady | 1080p30 streams | decoders |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in r["job"].items():
            if "error" in v:
                lines.append(f"| {k} | | | {v['error']} | | | |")
                continue
            lines.append(f"| {k} | {v['actors']} x {v['sessions']} | {v['frames']} | {v['fps_total']:.0f} | "
                         f"{v['fps_steady']:.0f} | {v['streams_1080p30']:.1f} | {'; '.join(v['decoders_used'])} |")
    return "\n".join(lines)



if __name__ == "__main__":
    if any(a == "--gpu" or a.startswith("--gpu=") or a == "--merge" for a in sys.argv[1:]):
        gpu_main(sys.argv[1:])
    else:
        main()
