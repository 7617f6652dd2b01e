"""GPU decode (NVDEC) through torchcodec's CUDA decoder, behind an availability check.

Used when ``video.decoder`` is ``nvdec`` or ``auto`` and :func:`nvdec_availability` says yes
(torch with CUDA, torchcodec importable, and a real tiny H.264 decode on the GPU works);
otherwise the CPU decoder (PyAV) is used and the reason is reported.

Frames are produced with the same integer-PTS rules as the CPU path: torchcodec gives PTS in
seconds (double), converted back to ticks of the stream ``time_base`` probed with PyAV, and
frames are assigned to the segment by that integer PTS. Decoding goes in chunks of
``chunk_s`` seconds so that a long segment never sits decoded in GPU memory at once.
The detector takes host arrays, so processed frames are copied to the host once (BGR);
the motion gate's thumbnail is computed on the GPU.

A second backend, NVIDIA's ``PyNvVideoCodec`` (a self-contained wheel: its own FFmpeg demuxer and
CUDA runtime, no torch needed), is at the end of this module: :func:`pynvvideocodec_availability`
and :func:`iter_file_frames_pynvvideocodec` decode a local file on the GPU with the stream's
integer PTS, for the decode benchmark and for comparison with the CPU decoder.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import time
from collections.abc import Iterator
from fractions import Fraction

import numpy as np

from raydetect.video.decode import DecodeStats
from raydetect.video.segments import Segment


@functools.lru_cache(maxsize=1)
def nvdec_availability() -> tuple[bool, str]:
    """``(usable, reason)``; the reason names the missing piece when not usable."""
    if importlib.util.find_spec("torchcodec") is None:  # checked first: importing torch is slow
        return False, "torchcodec is not installed"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder
    except Exception as e:  # ImportError, or a torchcodec/FFmpeg/torch mismatch at load time
        return False, f"torchcodec not usable: {type(e).__name__}: {e}"
    try:
        data = _tiny_h264()
        dec = VideoDecoder(data, device="cuda", seek_mode="approximate")
        frame = dec.get_frame_at(0)
        if not frame.data.is_cuda:
            return False, "torchcodec returned a CPU frame for device='cuda'"
    except Exception as e:
        return False, f"torchcodec CUDA decode failed: {type(e).__name__}: {e}"
    return True, f"torchcodec {getattr(torchcodec, '__version__', '?')} on {torch.cuda.get_device_name()}"


def _tiny_h264() -> bytes:
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264" if "libx264" in av.codecs_available else "h264", rate=10)
        s.width, s.height, s.pix_fmt = 128, 128, "yuv420p"
        for i in range(4):
            img = np.full((128, 128, 3), 40 * i, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


class TensorFrame:
    """One decoded frame on the GPU (HWC, RGB, uint8)."""

    __slots__ = ("data", "pts", "width", "height")

    def __init__(self, data, pts: int) -> None:
        self.data = data
        self.pts = pts
        self.height, self.width = int(data.shape[0]), int(data.shape[1])

    def bgr(self) -> np.ndarray:
        return self.data.flip(-1).contiguous().cpu().numpy()

    def grey(self) -> np.ndarray:
        x = self.data.float()
        y = x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114
        return y.round().clamp(0, 255).to(dtype=self.data.dtype).cpu().numpy()


def iter_segment_frames_nvdec(
    fileobj,
    segment: Segment,
    time_base: Fraction,
    frame_pts: Fraction,
    end_pts: int | None,
    stats: DecodeStats,
    *,
    chunk_s: float = 2.0,
    device: str = "cuda",
) -> Iterator[tuple[TensorFrame, int | None]]:
    """NVDEC counterpart of :func:`raydetect.video.decode.iter_segment_frames`."""
    from torchcodec.decoders import VideoDecoder

    t0 = time.perf_counter()
    try:
        dec = VideoDecoder(fileobj, device=device, seek_mode="approximate", dimension_order="NHWC")
    except Exception as e:
        stats.seconds += time.perf_counter() - t0
        stats.add_error(None, f"nvdec open failed: {type(e).__name__}: {e}", merge=False)
        stats.eof = True
        return
    md = dec.metadata
    begin_s = float(getattr(md, "begin_stream_seconds", None) or 0.0)
    stream_end_s = getattr(md, "end_stream_seconds", None) or getattr(md, "duration_seconds", None) or 0.0
    if end_pts is not None:
        stream_end_s = max(stream_end_s, float(end_pts * time_base))
    stats.seconds += time.perf_counter() - t0

    def to_pts(seconds: float) -> int:
        return math.floor(Fraction(seconds) / time_base + Fraction(1, 2))

    # Start one tick before the segment so the frame playing then (the previous one) is seen.
    lo = float((segment.start - 1) * time_base) if segment.start is not None else begin_s
    hi_limit = float(segment.end * time_base) if segment.end is not None else stream_end_s
    prev: int | None = None
    last_seen: int | None = None
    beyond = 0
    lo = max(lo, begin_s)
    while lo < hi_limit + float(frame_pts * time_base) and beyond == 0:
        hi = lo + chunk_s
        t0 = time.perf_counter()
        try:
            batch = dec.get_frames_played_in_range(lo, hi)
        except Exception as e:
            stats.seconds += time.perf_counter() - t0
            stats.add_error(last_seen, f"nvdec decode error: {type(e).__name__}: {e}", merge=False)
            stats.eof = True
            return
        stats.seconds += time.perf_counter() - t0
        if len(batch.pts_seconds) == 0 and hi >= stream_end_s:
            break
        for i, ps in enumerate(batch.pts_seconds.tolist()):
            pts = to_pts(ps)
            if last_seen is not None and pts <= last_seen:
                continue  # the frame still playing at the chunk start was already seen
            last_seen = pts
            stats.max_pts = pts if stats.max_pts is None else max(stats.max_pts, pts)
            if segment.start is not None and pts < segment.start:
                stats.extra += 1
                prev = pts
                continue
            if segment.end is not None and pts >= segment.end:
                stats.extra += 1
                beyond += 1
                continue
            stats.frames += 1
            yield TensorFrame(batch.data[i], pts), prev
            prev = pts
        lo = hi
    if beyond == 0:
        stats.eof = True


# --- PyNvVideoCodec backend ------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def pynvvideocodec_availability() -> tuple[bool, str]:
    """``(usable, reason)`` for NVIDIA's PyNvVideoCodec: importable (driver, NVDEC libraries) and
    a real decode of a tiny H.264 clip on GPU 0 returns its frames."""
    if importlib.util.find_spec("PyNvVideoCodec") is None:
        return False, "PyNvVideoCodec is not installed"
    try:
        import PyNvVideoCodec as nvc
    except Exception as e:  # no driver, no libnvcuvid / libnvidia-encode (container without 'video')
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"PyNvVideoCodec not usable: {type(e).__name__}: {first}"
    try:
        data = _tiny_h264()
    except Exception as e:
        return True, f"PyNvVideoCodec {nvc.__version__} (imported; no test clip: {type(e).__name__}: {e})"
    try:
        dec = nvc.SimpleDecoder(data, gpu_id=0, use_device_memory=True)
        n = 0
        while batch := dec.get_batch_frames(8):
            n += len(batch)
    except Exception as e:
        return False, f"PyNvVideoCodec decode failed: {type(e).__name__}: {e}"
    if n != 4:
        return False, f"PyNvVideoCodec decoded {n} frames of a 4-frame test clip"
    return True, f"PyNvVideoCodec {nvc.__version__}"


def iter_file_frames_pynvvideocodec(
    path: str, *, rgb_to_host: bool = False, gpu_id: int = 0, batch: int = 32, decoder=None
) -> Iterator[tuple[int, np.ndarray | None]]:
    """Every frame of the local file ``path`` decoded by NVDEC, in presentation order, as
    ``(pts, rgb)``: ``pts`` in ticks of the stream time base (as PyAV gives them), ``rgb`` a host
    HWC uint8 RGB array when ``rgb_to_host`` (GPU colour conversion, copied through DLPack with
    torch), else ``None`` (frames stay in GPU memory as NV12: decode only).

    ``decoder``: an open ``PyNvVideoCodec.SimpleDecoder`` to reuse (it is rewound to frame 0), so
    that repeated passes do not pay the session start again."""
    if decoder is None:
        decoder = open_pynvvideocodec(path, rgb=rgb_to_host, gpu_id=gpu_id)
    else:
        decoder.seek_to_index(0)
    to_host = None
    if rgb_to_host:
        import torch

        to_host = lambda f: torch.from_dlpack(f).cpu().numpy()  # noqa: E731
    while True:
        frames = decoder.get_batch_frames(batch)
        if not frames:
            return
        for f in frames:
            yield int(f.getPTS()), (to_host(f) if to_host else None)


def open_pynvvideocodec(path: str, *, rgb: bool = False, gpu_id: int = 0):
    """A ``PyNvVideoCodec.SimpleDecoder`` on ``path`` with device-memory output (NV12, or RGB HWC)."""
    import PyNvVideoCodec as nvc

    color = nvc.OutputColorType.RGB if rgb else nvc.OutputColorType.NATIVE
    return nvc.SimpleDecoder(str(path), gpu_id=gpu_id, use_device_memory=True, output_color_type=color)


def cuda_synchronize() -> None:
    """Wait for the GPU (cupy or torch, whichever imports), so that timings include all work."""
    try:
        import cupy

        cupy.cuda.runtime.deviceSynchronize()
        return
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception:
        pass
