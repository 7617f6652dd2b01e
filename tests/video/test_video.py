"""Video inputs: real videos encoded with PyAV in a temporary folder, decoded through fsspec.

The decode/segment/sampling/gating logic is checked without the detector (fast); the detector
runs on few, small frames; the Ray job runs on a mixed folder and on the local S3 server.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import av
import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from raydetect import read_results
from raydetect.config import ConfigError, DetectorConfig, JobConfig, VideoConfig, validate
from raydetect.types import RESULT_SCHEMA, VIDEO_RESULT_SCHEMA, VIDEO_SUMMARY_SCHEMA, table_to_frame_results
from raydetect.video.decode import DecodeStats, iter_segment_frames, select_frames
from raydetect.video.detect import SegmentTask, detect_segment, plan_video
from raydetect.video.gate import MotionGate
from raydetect.video.probe import VideoError, open_video, probe_video
from raydetect.video.segments import Sampler, Segment, frame_index, plan_segments
from tests.conftest import MODELS, photo_paths

MODEL = str(MODELS / "yolov8n-dynamic-random.onnx")
H264 = "libx264" if "libx264" in av.codecs_available else "mpeg4"
W, H = 160, 120


def frame_image(i: int, static: tuple[int, int] | None = None) -> np.ndarray:
    """Frame ``i``: a bright square moving 6 px per frame on a dark textured background; during
    ``static`` = [a, b) the square stays where it was at frame ``a``."""
    pos = i if static is None or not (static[0] <= i < static[1]) else static[0]
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.zeros((H, W, 3), np.uint8)
    img[..., 0] = 40 + (xx // 8 % 2) * 20
    img[..., 1] = 60 + (yy // 8 % 2) * 20
    img[..., 2] = 50
    x = (pos * 6) % (W - 30)
    img[40:70, x : x + 30] = (230, 200, 90)
    return img


def make_video(path, n=70, fps=10, codec=H264, fmt=None, static=None, gop=20, bframes=None, options=None):
    """Encode ``n`` frames at ``fps``; returns ``path``."""
    with av.open(str(path), "w", format=fmt, options=options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.gop_size = gop
        if bframes is not None:
            s.codec_context.max_b_frames = bframes
        for i in range(n):
            f = av.VideoFrame.from_ndarray(frame_image(i, static), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def sequential_pts(path) -> list[int]:
    with av.open(str(path)) as c:
        return [f.pts for f in c.decode(video=0)]


def segment_frames(path, segment_s, **sampling):
    """``[(segment, pts, kept)]`` decoding every planned segment on its own."""
    tasks = plan_video(str(path), VideoConfig(segment_s=segment_s))
    out = []
    for t in tasks:
        info = t.info
        sampler = Sampler(info.origin, info.time_base, info.fps, **sampling)
        with open_video(str(path)) as (c, s):
            for fr, prev in iter_segment_frames(c, s, t.segment, DecodeStats()):
                out.append((t.segment.index, fr.pts, sampler.keep(fr.pts, prev), sampler.index(fr.pts)))
    return tasks, out


# --- pure planning ----------------------------------------------------------------------------


def test_plan_segments_cover_every_pts_once():
    tb = Fraction(1, 12800)
    segs = plan_segments(origin=512, end_pts=512 + 7 * 12800, time_base=tb, segment_s=2)
    assert [(s.start, s.end) for s in segs] == [
        (None, 512 + 25600), (512 + 25600, 512 + 51200), (512 + 51200, 512 + 76800), (512 + 76800, None)
    ]
    for pts in [-10**9, 0, 511, 512, 512 + 25599, 512 + 25600, 512 + 89599, 10**12]:
        assert sum(s.contains(pts) for s in segs) == 1
    assert plan_segments(0, None, tb, 2) == [Segment(0, None, None)]  # unknown duration: one segment
    assert len(plan_segments(0, 7 * 12800, tb, 60)) == 1
    # 0.1 s is exactly 1280 ticks (decimal, not the binary float 0.1)
    assert plan_segments(0, 12800, tb, 0.1)[1].start == 1280
    # a remainder under a quarter of a segment joins the last one (still open above)
    tail = plan_segments(0, 601 * 12800, tb, 150)
    assert [(s.start, s.end) for s in tail] == [(None, 150 * 12800), (150 * 12800, 300 * 12800),
                                                (300 * 12800, 450 * 12800), (450 * 12800, None)]
    assert len(plan_segments(0, 637 * 12800, tb, 150)) == 4  # 37 s < 37.5 s: joins
    assert len(plan_segments(0, 638 * 12800, tb, 150)) == 5  # 38 s: a segment of its own


def test_sampling_by_fps_is_first_frame_at_or_after_each_instant():
    tb, rate = Fraction(1, 12800), Fraction(25)
    pts = [i * 512 for i in range(250)]  # 10 s at 25 fps
    sampler = Sampler(0, tb, rate, fps=10)
    kept = [i for i, p in enumerate(pts) if sampler.keep(p, pts[i - 1] if i else None)]
    expected = sorted({math.ceil(Fraction(25, 10) * k) for k in range(100)})  # first i with i/25 >= k/10
    assert kept == expected and len(kept) == 100
    # fps above the stream rate keeps every frame
    fast = Sampler(0, tb, rate, fps=60)
    assert all(fast.keep(p, pts[i - 1] if i else None) for i, p in enumerate(pts))


def test_every_and_frame_index_come_from_pts():
    tb, rate = Fraction(1, 90000), Fraction(30000, 1001)  # 29.97 fps
    pts = [1800 + i * 3003 for i in range(100)]
    assert [frame_index(p, 1800, tb, rate) for p in pts] == list(range(100))
    sampler = Sampler(1800, tb, rate, every=7)
    assert [i for i, p in enumerate(pts) if sampler.keep(p, None)] == list(range(0, 100, 7))
    with pytest.raises(ValueError):
        Sampler(0, tb, rate, fps=2, every=3)


def test_gate_skips_below_threshold_and_refreshes():
    gate = MotionGate(threshold=2.0, refresh=4, width=8)
    a = np.zeros((6, 8), np.float32)
    b = a + 1.0  # below threshold
    c = a + 5.0  # above
    decisions = [gate.decide(x) for x in [a, b, b, c, c, c, c, c, a]]
    assert [d.process for d in decisions] == [True, False, False, True, False, False, False, True, True]
    assert decisions[0].score is None and decisions[1].score == pytest.approx(1.0)
    assert decisions[7].forced and not decisions[3].forced
    gate.reset()
    assert gate.decide(c).process  # first frame after a reset (segment start)


def test_video_config_is_validated_with_field_names():
    with pytest.raises(ConfigError, match=r"job\.video: .*fps .* or every"):
        validate(JobConfig, {"input": "a", "output": "b", "detector": {"model": "m"},
                             "video": {"fps": 2, "every": 3}}, "job")
    with pytest.raises(ConfigError, match=r"job\.video\.segment_s"):
        validate(JobConfig, {"input": "a", "output": "b", "detector": {"model": "m"},
                             "video": {"segment_s": 0}}, "job")
    cfg = validate(VideoConfig, {"extensions": ["MP4", ".Mkv"]})
    assert cfg.extensions == (".mp4", ".mkv")


def test_cli_video_options():
    from raydetect.cli import build_parser
    from raydetect.cli.detect import job_config

    args = build_parser().parse_args(
        ["detect", "--input", "in", "--output", "out", "--model", "m.onnx", "--segment-s", "30",
         "--fps", "2.5", "--gate", "--gate-threshold", "3", "--gate-refresh", "10"]
    )
    v = job_config(args).video
    assert (v.segment_s, v.fps, v.every, v.gate, v.gate_threshold, v.gate_refresh) == (30, 2.5, None, True, 3, 10)
    # one of --fps / --every: the config's check (flags are generated from the fields)
    with pytest.raises(ConfigError, match="not both"):
        job_config(build_parser().parse_args(["detect", "--input", "i", "--output", "o", "--model", "m",
                                              "--fps", "2", "--every", "3"]))


# --- real decoding ----------------------------------------------------------------------------

FORMATS = [
    ("h264.mp4", H264, None, None),
    ("hevc.mkv", "libx265" if "libx265" in av.codecs_available else H264, None, None),
    ("mpeg4.avi", "mpeg4", None, None),
    ("mpeg4-bframes.avi", "mpeg4", None, 2),  # keyframes indexed by decode time: seeks overshoot
    ("mpeg4.mov", "mpeg4", None, None),
]


@pytest.mark.parametrize("name,codec,fmt,bframes", FORMATS, ids=[f[0] for f in FORMATS])
def test_segments_give_each_frame_exactly_once(tmp_path, name, codec, fmt, bframes):
    path = make_video(tmp_path / name, n=70, fps=10, codec=codec, fmt=fmt, bframes=bframes)
    info = probe_video(str(path))
    assert (info.width, info.height, info.fps) == (W, H, 10)
    assert info.duration_s == pytest.approx(7.0, abs=0.11)
    reference = sequential_pts(path)
    assert len(reference) == 70 and len(set(reference)) == 70
    tasks, frames = segment_frames(path, 2.0)
    assert len(tasks) == 4
    assert [p for _, p, _, _ in frames] == reference  # same frames, same order, none twice
    # each frame in the segment of its PTS; frame indices are global
    tb, origin = info.time_base, info.origin
    for seg, pts, _, _ in frames:
        assert seg == min(3, math.floor((pts - origin) * tb / 2))
    assert [idx for *_, idx in frames] == [frame_index(p, origin, tb, info.fps) for p in reference]
    # AVI has no PTS: with B-frames FFmpeg derives them from decode order, one frame late
    first = 1 if bframes else 0
    assert sorted(idx for *_, idx in frames) == list(range(first, first + 70))


def test_sampling_is_identical_with_and_without_segments(tmp_path):
    path = make_video(tmp_path / "v25.mp4", n=63, fps=25)
    for sampling in ({"fps": 3}, {"fps": 7.5}, {"every": 4}):
        _, whole = segment_frames(path, 3600, **sampling)
        _, split = segment_frames(path, 0.7, **sampling)  # boundaries fall between frames
        assert [(p, k) for _, p, k, _ in split] == [(p, k) for _, p, k, _ in whole]
        kept = [i for _, _, k, i in whole if k]
        if "every" in sampling:
            assert kept == list(range(0, 63, 4))
        else:
            f = Fraction(sampling["fps"]).limit_denominator(10)
            expected = sorted({math.ceil(Fraction(25) / f * k) for k in range(100)} & set(range(63)))
            assert kept == expected
    assert len({s for s, *_ in split}) == 4


def test_gate_skips_the_static_stretch_and_processes_the_moving_one(tmp_path):
    path = make_video(tmp_path / "gate.mp4", n=60, fps=10, static=(20, 45))
    task = plan_video(str(path), VideoConfig(segment_s=60))[0]
    gate = MotionGate(threshold=0.5, refresh=10, width=64)
    sampler = Sampler(task.info.origin, task.info.time_base, task.info.fps)
    counters = {"sampled": 0}
    with open_video(str(path)) as (c, s):
        sel = [(x.index, x.decision) for x in select_frames(
            iter_segment_frames(c, s, task.segment, DecodeStats()), sampler, gate, counters)]
    processed = [i for i, d in sel if d.process]
    assert counters["sampled"] == 60
    assert set(range(0, 21)) <= set(processed)  # moving: every frame (20: the square jumps back)
    assert set(range(45, 60)) <= set(processed)
    static_processed = [i for i in processed if 21 <= i < 45]
    assert static_processed == [30, 40]  # only the forced refreshes (every 10th frame)
    assert all(d.score is not None and d.score < 0.5 for i, d in sel if 21 <= i < 45 and not d.process)


# --- detector on frames -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(data_dir):
    from raydetect.detector import Detector

    return Detector(DetectorConfig(model=MODEL, conf=1e-4, batch_size=4))


def test_rows_carry_the_detections_of_their_own_frame(tmp_path, detector):
    path = make_video(tmp_path / "rows.mkv", n=30, fps=10)
    video = VideoConfig(segment_s=1.5, every=6)
    rows = []
    for task in plan_video(str(path), video):
        rows += detect_segment(detector, task, video).rows
    assert [r.frame for r in rows] == [0, 6, 12, 18, 24]
    assert [r.segment for r in rows] == [0, 0, 0, 1, 1]
    assert [r.pts_s for r in rows] == pytest.approx([0.0, 0.6, 1.2, 1.8, 2.4])
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="bgr24") for f in c.decode(video=0)]
    direct = detector.detect([frames[i] for i in (0, 6, 12, 18, 24)])
    for r, d in zip(rows, direct, strict=True):
        assert r.error is None and not r.skipped and (r.result.width, r.result.height) == (W, H)
        assert len(r.detections) == len(d.detections) > 0
        assert r.detections == d.detections


def truncate(path, fraction, out):
    data = path.read_bytes()
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


@pytest.mark.parametrize("kind", ["mkv", "mp4-faststart"])
def test_truncated_video_keeps_frames_before_the_damage(tmp_path, detector, kind):
    if kind == "mkv":
        full = make_video(tmp_path / "full.mkv", n=70, fps=10)
    else:
        full = make_video(tmp_path / "full.mp4", n=70, fps=10, options={"movflags": "faststart"})
    cut = truncate(full, 0.5, tmp_path / f"cut.{full.suffix[1:]}")
    good = sequential_pts(full)
    video = VideoConfig(segment_s=2, every=10)
    tasks = plan_video(str(cut), video)
    assert len(tasks) == 4  # the headers still say 7 s
    rows = []
    for task in tasks:
        rows += detect_segment(detector, task, video).rows  # never raises
    frames = [r for r in rows if r.frame is not None]
    errors = [r for r in rows if r.error is not None]
    assert frames and all(r.error is None and r.detections for r in frames)
    damage = min(r.pts for r in errors if r.pts is not None)
    # every sampled frame before the damage is there, with its exact timestamp
    tb = probe_video(str(cut)).time_base
    expected = [p for i, p in enumerate(good) if i % 10 == 0 and p < damage]
    assert [r.pts for r in frames] == expected and len(expected) >= 2
    assert all(float(r.pts * tb) == r.pts_s for r in frames)
    assert any("truncated" in r.error or "decode error" in r.error for r in errors)
    assert all(r.detections == [] and r.frame is None for r in errors)


def test_unreadable_video_is_one_error_row(tmp_path, detector):
    full = make_video(tmp_path / "index-at-end.mp4", n=30, fps=10)  # moov written last
    cut = truncate(full, 0.5, tmp_path / "cut.mp4")
    (tmp_path / "text.avi").write_text("not a video\n" * 100)
    for p in (cut, tmp_path / "text.avi"):
        with pytest.raises(VideoError, match="cannot read the container"):
            probe_video(str(p))
        (task,) = plan_video(str(p), VideoConfig())
        assert task.error and task.info is None
        task = SegmentTask.from_json(task.to_json())
        out = detect_segment(detector, task, VideoConfig())
        assert [r.error for r in out.rows] == [task.error] and out.stats["errors"] == 1


# --- Ray Data job -----------------------------------------------------------------------------


def read_video_output(out, fs=None):
    frames = pads.dataset(f"{out}/_videos", format="parquet", filesystem=fs).to_table()
    summary = pq.read_table(f"{out}/_video_summary/summary.parquet", filesystem=fs)
    return frames, summary


def test_mixed_folder_job_with_segments_spread_over_actors(ray_local, tmp_path):
    from raydetect.job.run import run_job

    inp = tmp_path / "in"
    inp.mkdir()
    photo = photo_paths()[0]
    (inp / photo.name).write_bytes(photo.read_bytes())
    make_video(inp / "long.mp4", n=80, fps=10, static=(30, 80))
    make_video(inp / "short.avi", n=12, fps=10, codec="mpeg4")
    truncate(make_video(tmp_path / "t.mkv", n=40, fps=10), 0.5, inp / "cut.mkv")
    out = tmp_path / "out"
    cfg = JobConfig(
        input=str(inp), output=str(out), progress=False, concurrency=2, min_actors=2, num_cpus=0.5,
        detector=DetectorConfig(model=MODEL, conf=1e-4, batch_size=4),
        video=VideoConfig(segment_s=2, every=5, gate=True, gate_threshold=0.5, gate_refresh=3),
    )
    summary = run_job(cfg)

    # images: the usual schema at the top of the output; pyarrow.dataset.dataset(OUTPUT) as the
    # README has it reads them alone (the video folders start with "_")
    images = pads.dataset(str(out)).to_table()
    assert images.schema.equals(RESULT_SCHEMA, check_metadata=False)
    assert images.column("uri").to_pylist() == [str(inp / photo.name)] and summary.images == 1

    frames, vsum = read_video_output(out)
    # raydetect.read_results: the same three tables
    res = read_results(str(out))
    assert res.images.equals(images)
    assert res.frames.num_rows == frames.num_rows and res.frames.schema.equals(frames.schema)
    assert res.frames.equals(frames.sort_by([("uri", "ascending"), ("segment", "ascending"), ("pts", "ascending")]))
    assert res.video_summary.equals(vsum.sort_by("uri"))
    assert frames.schema.equals(VIDEO_RESULT_SCHEMA, check_metadata=False)
    assert vsum.schema.equals(VIDEO_SUMMARY_SCHEMA, check_metadata=False)
    rows = table_to_frame_results(frames)
    long_rows = sorted((r for r in rows if r.uri.endswith("long.mp4")), key=lambda r: r.frame)
    assert [r.frame for r in long_rows] == list(range(0, 80, 5))
    assert [r.segment for r in long_rows] == [i // 20 for i in range(0, 80, 5)]
    skipped = [r.frame for r in long_rows if r.skipped]
    assert skipped and all(f > 30 for f in skipped)  # only in the static stretch
    assert all(r.detections == [] and r.ref_frame is not None and r.ref_frame < r.frame for r in long_rows
               if r.skipped)
    assert frames.filter(frames["skipped"]).column("detections").null_count == len(skipped)
    assert all(r.detections for r in long_rows if not r.skipped)
    short = [r for r in rows if r.uri.endswith("short.avi")]
    assert [r.frame for r in short] == [0, 5, 10] and not any(r.error for r in short)
    cut = [r for r in rows if r.uri.endswith("cut.mkv")]
    assert any(r.error for r in cut) and any(r.frame == 0 and not r.error for r in cut)

    by_uri = {r["uri"]: r for r in vsum.to_pylist()}
    long_sum = by_uri[str(inp / "long.mp4")]
    assert long_sum["segments"] == 4 and long_sum["frames_decoded"] == 80 and long_sum["frames_sampled"] == 16
    assert long_sum["frames_skipped"] == len(skipped)
    assert long_sum["frames_processed"] == 16 - len(skipped) and long_sum["errors"] == 0
    assert long_sum["decode_fps"] > 0 and long_sum["decoder"] == "cpu"
    # --video-decoder auto (the default) in actors without a GPU: the CPU, and the summary says why
    assert long_sum["decoder_reason"] == "auto: no GPU assigned to the actor"
    assert by_uri[str(inp / "cut.mkv")]["errors"] >= 1
    assert summary.video.videos == 3 and summary.video.frames_skipped == len(skipped)
    assert summary.video.errors == sum(r.error is not None for r in rows)

    # one file per (video, segment); the four segments of long.mp4 were four separate rows
    # (units of work any actor can take; which actor takes which depends on start-up timing,
    # so the spread over actors is not asserted on a loaded 2-core machine)
    files = sorted(p.name for p in (out / "_videos").iterdir())
    assert len(files) == 4 + 1 + 2 and not any(f.startswith(".") for f in files)
    long_segments = [r for r in summary.video.segment_rows if r["uri"].endswith("long.mp4")]
    assert sorted(r["segment"] for r in long_segments) == [0, 1, 2, 3]
    assert all(r["worker"] for r in long_segments)


def test_videos_from_s3(ray_local, s3_storage, s3fs_client, tmp_path):
    from raydetect.job.run import run_job

    bucket = "videos-test"
    s3fs_client.mkdir(bucket)
    local = make_video(tmp_path / "cam.mov", n=40, fps=10, codec="mpeg4")
    s3fs_client.put(str(local), f"{bucket}/archive/cam.mov")
    uri = f"s3://{bucket}/archive/cam.mov"

    # the S3 file object gives the same frames as the local file
    tasks = plan_video(uri, VideoConfig(segment_s=1.5), s3_storage)
    assert len(tasks) == 3
    _, local_frames = segment_frames(local, 1.5)
    s3_frames = []
    for t in tasks:
        with open_video(uri, s3_storage) as (c, s):
            s3_frames += [fr.pts for fr, _ in iter_segment_frames(c, s, t.segment, DecodeStats())]
    assert s3_frames == [p for _, p, _, _ in local_frames]

    cfg = JobConfig(
        input=f"s3://{bucket}/archive", output=f"s3://{bucket}/out", progress=False, num_cpus=0.5,
        detector=DetectorConfig(model=MODEL, conf=1e-4, batch_size=4, storage=s3_storage),
        video=VideoConfig(segment_s=1.5, fps=1),
    )
    summary = run_job(cfg)
    frames, vsum = read_video_output(f"{bucket}/out", s3fs_client)
    rows = table_to_frame_results(frames)
    assert sorted(r.frame for r in rows) == [0, 10, 20, 30] and all(r.uri == uri for r in rows)
    assert all(r.detections and r.error is None for r in rows)
    assert vsum.column("frames_decoded").to_pylist() == [40] and summary.video.segments == 3
    # --video-decoder auto over s3:// on a CPU-only machine: PyAV, and why (the job's actors have no GPU)
    assert vsum.column("decoder").to_pylist() == ["cpu"]
    assert vsum.column("decoder_reason").to_pylist() == ["auto: no GPU assigned to the actor"]
    assert summary.video.segments_resumed == 0
    res = read_results(f"s3://{bucket}/out", s3_storage)  # read_results on S3: frames and summary
    assert res.images.num_rows == 0 and res.frames.num_rows == 4 and res.video_summary.equals(vsum)

    # a re-run resumes: every segment file is there, nothing is decoded or written again
    again = run_job(cfg)
    assert again.video.segments_resumed == 3 and "resumed: 3 segments" in again.line()
    frames2, vsum2 = read_video_output(f"{bucket}/out", s3fs_client)
    assert frames2.sort_by("frame").equals(frames.sort_by("frame"))
    assert vsum2.equals(vsum)  # the counters (timings too) come from the segment files
    # other video settings into the same output are refused, naming what differs
    with pytest.raises(FileExistsError, match="video: .*'fps': 1.0.* then, .*'fps': 2.0"):
        run_job(cfg.model_copy(update={"video": VideoConfig(segment_s=1.5, fps=2)}))
    # an output written before the segment-tail rule (its manifest lacks it) is refused too: its
    # segment files were cut by another rule
    manifest = json.loads(s3fs_client.cat(f"{bucket}/out/_job.json"))
    del manifest["settings"]["video"]["segment_tail"]
    s3fs_client.pipe(f"{bucket}/out/_job.json", json.dumps(manifest).encode())
    with pytest.raises(FileExistsError, match="segment_tail"):
        run_job(cfg)


# --- NVDEC (issue 15) ---------------------------------------------------------------------------
#
# CPU tests: the device-side colour and thumbnail arithmetic (run on CPU tensors), the decoder
# choice, the per-segment fallback, several segments batched together, the CLI. GPU tests (only
# where PyNvVideoCodec decodes on a CUDA device): NVDEC vs PyAV frame by frame on the real clip
# and on 1080p H.264/HEVC clips made from it (B-frames), and the detector fed from NVDEC.

CLIP = MODELS.parent / "video" / "traffic-highway-2s.mp4"


def _nvdec() -> tuple[bool, str]:
    from raydetect.video.nvdec import nvdec_availability

    return nvdec_availability()


def _real_frames(step=6, size=None):
    with av.open(str(CLIP)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i % step == 0:
                yield f if size is None else f.reformat(width=size[0], height=size[1])


@pytest.mark.skipif(not CLIP.exists(), reason="the traffic clip is not in the test data")
def test_device_colour_conversion_and_thumbnail_match_pyav():
    """nv12_to_rgb / grey_thumbnail_gpu are torch code for the GPU; on CPU tensors they give the
    same numbers. RGB: within 3 grey levels of PyAV's rgb24 (nearest chroma, as swscale); the
    gate's thumbnail: exactly PyAV gray + OpenCV INTER_AREA (integer factors and 854x480)."""
    torch = pytest.importorskip("torch")
    from raydetect.video.gate import grey_thumbnail
    from raydetect.video.nvdec import grey_thumbnail_gpu, nv12_to_rgb

    for size in (None, (1920, 1080), (854, 480)):
        for f in _real_frames(size=size):
            nv12 = f.to_ndarray(format="nv12")
            rgb = nv12_to_rgb(torch.from_numpy(nv12), f.height, f.width).permute(1, 2, 0).numpy()
            d = np.abs(rgb.astype(int) - f.to_ndarray(format="rgb24").astype(int))
            assert d.mean() < 1.5 and d.max() <= 3, (size, d.mean(), d.max())
            thumb = grey_thumbnail_gpu(torch.from_numpy(nv12[: f.height]), 64)
            assert np.array_equal(thumb, grey_thumbnail(f.to_ndarray(format="gray"), 64)), size


def test_annexb_packets_carry_the_pts_of_pyav_frames(tmp_path):
    """What the NVDEC path relies on: after the Annex B filter, each packet's PTS is the PTS
    PyAV's decoder gives its picture, so NVDEC (which hands every displayed picture the PTS of
    its packet) reproduces PyAV's frame PTS, B-frames included (packets are in decode order) —
    except packets the demuxer flags discard (outside the edit list: the traffic clip's last
    packet), whose pictures PyAV does not output either."""
    from av.bitstream import BitStreamFilterContext

    from raydetect.video.nvdec import ANNEXB_FILTERS

    clips = [make_video(tmp_path / "b.mp4", n=40, fps=10, bframes=2)]
    if CLIP.exists():
        clips.append(CLIP)
    for path in clips:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            bsf = BitStreamFilterContext(ANNEXB_FILTERS[s.codec_context.name], s)
            pts, discard = [], set()
            for pkt in c.demux(s):
                if pkt.size and pkt.is_discard:
                    discard.add(pkt.pts)  # outside the edit list: NvdecPacketDecoder drops its picture
                pts += [p.pts for p in (bsf.filter(pkt) if pkt.size else bsf.filter(None))]
        assert pts != sorted(pts)  # reordered: B-frames
        assert sorted(p for p in pts if p not in discard) == sequential_pts(path)


def test_resolve_decoder_says_why():
    from raydetect.video.pipeline import resolve_decoder

    assert resolve_decoder("cpu", 1.0) == ("cpu", "requested")
    assert resolve_decoder("auto", 0.0) == ("cpu", "auto: no GPU assigned to the actor")
    ok, reason = _nvdec()
    for choice in ("nvdec", "auto"):
        got = resolve_decoder(choice, 1.0)
        assert got == (("nvdec", reason) if ok else ("cpu", f"NVDEC unavailable: {reason}"))


def _rows(outcome):
    return [(r.frame, r.pts, r.skipped, r.ref_frame, r.error, len(r.result.detections)) for r in outcome.rows]


def test_nvdec_failure_falls_back_to_the_cpu_per_segment(tmp_path):
    """A stream NVDEC does not take (H.264 4:4:4 here; on a machine without PyNvVideoCodec any
    stream) is decoded on the CPU, with the same rows, and the reason in the counters."""
    from raydetect.detector import Detector
    from raydetect.video.detect import detect_segments

    src = tmp_path / "rgb444.mp4"
    with av.open(str(src), "w") as c:
        s = c.add_stream(H264, rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv444p" if H264 == "libx264" else "yuv420p"
        for i in range(30):
            f = av.VideoFrame.from_ndarray(frame_image(i), format="rgb24")
            f.pts = i
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    det = Detector(DetectorConfig(model=str(MODELS / "yolov5n-coco.onnx"), conf=1e-3, batch_size=4, device="cpu"))
    video = VideoConfig(segment_s=1, every=2, gate=True, gate_threshold=0.5, gate_refresh=3)
    tasks = plan_video(str(src), video)
    cpu = detect_segments(det, tasks, video, decoder="cpu")
    nv = detect_segments(det, tasks, video, decoder="nvdec")
    assert [_rows(o) for o in nv] == [_rows(o) for o in cpu]
    for o in nv:
        assert o.stats["decoder"] == "cpu"
        reason = o.stats["decoder_reason"]
        assert reason.startswith("NVDEC failed, decoded on the CPU: ")
        if H264 == "libx264":
            assert "pixel format yuv444p" in reason
    assert all(o.stats["frames_decoded"] > 0 for o in nv)


def test_segments_decoded_together_give_the_rows_of_one_at_a_time(tmp_path):
    """``video.sessions`` segments in one call (shared engine batches) = each segment alone."""
    from raydetect.detector import Detector
    from raydetect.video.detect import detect_segments

    a = make_video(tmp_path / "a.mp4", n=45, fps=10, static=(10, 40))
    b = make_video(tmp_path / "b.mp4", n=33, fps=10, bframes=2)
    det = Detector(DetectorConfig(model=MODEL, conf=1e-4, batch_size=3, device="cpu"))
    video = VideoConfig(segment_s=1.5, gate=True, gate_threshold=0.5, gate_refresh=4, sessions=4)
    tasks = plan_video(str(a), video) + plan_video(str(b), video)
    together = detect_segments(det, tasks, video)
    alone = [detect_segment(det, t, video) for t in tasks]
    assert [_rows(o) for o in together] == [_rows(o) for o in alone]
    for x, y in zip(together, alone, strict=True):
        assert x.stats["frames_processed"] == y.stats["frames_processed"] > 0
        assert x.stats["started"] <= x.stats["finished"]


def test_cli_video_decoder_and_sessions():
    from raydetect.cli import build_parser
    from raydetect.cli.detect import job_config

    base = ["detect", "--input", "in", "--output", "out", "--model", "m.onnx"]
    v = job_config(build_parser().parse_args(base)).video
    assert (v.decoder, v.sessions) == ("auto", VideoConfig().sessions)
    v = job_config(build_parser().parse_args(base + ["--video-decoder", "nvdec", "--video-sessions", "2"])).video
    assert (v.decoder, v.sessions) == ("nvdec", 2)
    for bad in (["--video-sessions", "0"], ["--video-decoder", "gpu"]):
        with pytest.raises(ConfigError):
            job_config(build_parser().parse_args(base + bad))


def _clip_1080p(tmp_path, codec, loops=2):
    """The traffic clip upscaled to 1080p and re-encoded (B-frames on), looped: the benchmark's."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("bench_video", Path(__file__).parents[2] / "benchmarks" / "video.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    once = tmp_path / f"{codec}-once.mp4"
    bench.make_clip(CLIP, once, codec)
    assert bench._has_b_frames(once)
    dst = tmp_path / f"{codec}-1080p.mp4"
    bench.loop_clip(once, dst, loops)
    return dst


def _decoded(path, segment, decoder, **sampling):
    """(pts, prev) of every frame, the sampled/gated decisions and some frames' RGB on the host."""
    info = probe_video(str(path))
    sampler = Sampler(info.origin, info.time_base, info.fps, **sampling)
    gate = MotionGate(1.0, 10)
    frames, decisions, pixels = [], [], {}
    counters = {"sampled": 0}

    def tap(it):
        for fr, prev in it:
            frames.append((fr.pts, prev))
            if len(frames) % 7 == 1:
                rgb = fr.rgb().permute(1, 2, 0).cpu().numpy() if decoder == "nvdec" else fr.bgr()[..., ::-1]
                pixels[fr.pts] = rgb
            yield fr, prev

    with open_video(str(path)) as (c, s):
        it = iter_segment_frames(c, s, segment, DecodeStats(), decoder=decoder)
        for sel in select_frames(tap(it), sampler, gate, counters):
            decisions.append((sel.frame.pts, sel.index, sel.decision.process, sel.decision.score))
    return frames, decisions, pixels


@pytest.mark.gpu
@pytest.mark.skipif(not _nvdec()[0], reason=f"NVDEC not usable here: {_nvdec()[1]}")
@pytest.mark.parametrize("clip", ["traffic", "h264-1080p", "hevc-1080p"])
def test_nvdec_gives_the_frames_of_pyav(tmp_path, clip):
    """Frame for frame: the same PTS (B-frames included), the same previous-frame PTS, the same
    sampled and gated frames (gate scores within 1e-3), and RGB within 3 grey levels (mean < 1.5)
    for whole files and for 1-s segments."""
    path = CLIP if clip == "traffic" else _clip_1080p(tmp_path, clip.split("-")[0])
    expected = len(sequential_pts(path))
    for segment_s, sampling in ((86_400, {}), (1.0, {"fps": 7.0}), (1.0, {"every": 3})):
        tasks = plan_video(str(path), VideoConfig(segment_s=segment_s))
        total = 0
        for t in tasks:
            cf, cd, cp = _decoded(path, t.segment, "cpu", **sampling)
            nf, nd, np_ = _decoded(path, t.segment, "nvdec", **sampling)
            assert nf == cf, (clip, t.segment)
            assert [d[:3] for d in nd] == [d[:3] for d in cd]
            for a, b in zip(nd, cd, strict=True):
                assert (a[3] is None) == (b[3] is None) and (a[3] is None or abs(a[3] - b[3]) < 1e-3)
            assert cp.keys() == np_.keys()
            for pts, ref in cp.items():
                d = np.abs(np_[pts].astype(int) - ref.astype(int))
                assert d.mean() < 1.5 and d.max() <= 3, (clip, pts, d.mean(), d.max())
            total += len(cf)
        print(clip, segment_s, sampling, "frames", total, "segments", len(tasks))
        assert total == expected


@pytest.mark.gpu
@pytest.mark.skipif(not _nvdec()[0], reason=f"NVDEC not usable here: {_nvdec()[1]}")
def test_nvdec_frames_go_to_the_gpu_detector(tmp_path):
    """The detector fed from NVDEC (RGB device tensors into its GPU stage when the engine has
    one) gives the rows of the CPU decoder: same frames, PTS, gating; detections within a few."""
    from raydetect.detector import Detector
    from raydetect.video.detect import detect_segments

    path = _clip_1080p(tmp_path, "h264", loops=3)
    det = Detector(DetectorConfig(model=str(MODELS / "yolov5n-coco.onnx"), batch_size=16))
    print("detector", det.engine.name, det.info()["stages"])
    video = VideoConfig(segment_s=1.0, gate=True, gate_threshold=1.0, sessions=3)
    tasks = plan_video(str(path), video)
    cpu = detect_segments(det, tasks, video, decoder="cpu")
    nv = detect_segments(det, tasks, video, decoder="nvdec")
    assert [o.stats["decoder"] for o in nv] == ["nvdec"] * len(tasks)
    key = lambda o: [(r.frame, r.pts, r.skipped, r.ref_frame, r.error) for r in o.rows]  # noqa: E731
    assert [key(o) for o in nv] == [key(o) for o in cpu]
    nc = sum(o.stats["detections"] for o in cpu)
    nn = sum(o.stats["detections"] for o in nv)
    print("detections cpu", nc, "nvdec", nn)
    assert nc > 0 and abs(nn - nc) <= max(3, 0.05 * nc)
