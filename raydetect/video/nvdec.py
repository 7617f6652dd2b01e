"""GPU decode (NVDEC) through NVIDIA's PyNvVideoCodec, fed by PyAV's demuxer.

Why PyAV demuxes: PyNvVideoCodec's own demuxer reported the *decode* timestamps of an MP4 with
B-frames (the traffic clip's first frame came out at PTS -2002 where PyAV says 0: two frames
off, and every frame after it too). Here the packets come from the same PyAV demuxer, seek and
segment logic as the CPU path (:func:`raydetect.video.decode.iter_segment_frames`, which takes a
``packet decoder``), converted to Annex B (``h264_mp4toannexb`` / ``hevc_mp4toannexb``) and
handed to PyNvVideoCodec's core decoder with the packet's PTS; NVDEC's parser reorders and
gives every displayed picture the PTS of its own packet, so each frame has exactly PyAV's PTS.

Frames stay in GPU memory: :class:`NvdecFrame` holds the NV12 picture (a torch CUDA tensor) and
converts on the device to RGB ``[3, h, w]`` uint8 (what the detector's GPU stage takes, see
:meth:`raydetect.stages.gpu_preprocess.GpuPreprocessor.decode`) and to the motion gate's grey thumbnail
(:func:`grey_thumbnail_gpu`: only the 64-px thumbnail is copied to the host). The colour
conversion is BT.601 limited range (BT.709 when the stream says so) with nearest chroma, as
swscale's default YUV→RGB path that the CPU decoder uses (measured on the traffic clip: mean
absolute difference about 1.2 grey levels, max 3); the grey image is PyAV's ``gray`` exactly
(limited → full range, integer arithmetic).

:func:`nvdec_availability` says whether this process can use it (PyNvVideoCodec importable,
torch with CUDA, a real decode of a tiny H.264 clip). Any failure of a NVDEC segment (unsupported
codec or bit depth, a decoder error) makes the caller decode the segment again on the CPU
(:mod:`raydetect.video.detect`), with the reason in the segment's ``decoder_reason``.

:func:`pynvvideocodec_availability` / :func:`iter_file_frames_pynvvideocodec` (PyNvVideoCodec's
own demuxer and ``SimpleDecoder``) stay for the decode benchmark's comparison.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

#: PyAV codec name → PyNvVideoCodec ``cudaVideoCodec`` member.
NVDEC_CODECS = {
    "h264": "H264",
    "hevc": "HEVC",
    "av1": "AV1",
    "vp9": "VP9",
    "vp8": "VP8",
    "mpeg2video": "MPEG2",
    "mpeg4": "MPEG4",
    "vc1": "VC1",
    "mjpeg": "JPEG",
}
#: codecs whose MP4/MKV packets are converted to Annex B before the NVDEC parser
ANNEXB_FILTERS = {"h264": "h264_mp4toannexb", "hevc": "hevc_mp4toannexb"}
#: pixel formats NVDEC gives as 8-bit NV12 (others: the segment goes to the CPU decoder)
NV12_PIX_FMTS = {"yuv420p", "yuvj420p", "nv12"}


class NvdecUnsupported(Exception):
    """This stream cannot be decoded by NVDEC here (the CPU decoder is used instead)."""


@functools.lru_cache(maxsize=1)
def nvdec_availability() -> tuple[bool, str]:
    """``(usable, reason)``: PyNvVideoCodec imports (driver, NVDEC libraries), torch sees a CUDA
    device, and a tiny H.264 clip decodes through :class:`NvdecPacketDecoder` to its 4 frames
    with their PTS."""
    if importlib.util.find_spec("PyNvVideoCodec") is None:  # checked first: importing torch is slow
        return False, "PyNvVideoCodec is not installed"
    from raydetect.gpu_probe import no_cuda_reason

    why = no_cuda_reason()
    if why is not None:
        return False, why
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    try:
        import PyNvVideoCodec as nvc
    except Exception as e:  # no libnvcuvid (a container without the 'video' capability), old driver
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return False, f"PyNvVideoCodec not usable: {type(e).__name__}: {first}"
    try:
        import av

        with av.open(io.BytesIO(_tiny_h264())) as c:
            s = c.streams.video[0]
            dec = NvdecPacketDecoder(s)
            pts = []
            for packet in c.demux(s):
                pts += [f.pts for f in dec.decode(packet)]
    except Exception as e:
        return False, f"PyNvVideoCodec decode failed: {type(e).__name__}: {e}"
    if len(pts) != 4:
        return False, f"PyNvVideoCodec decoded {len(pts)} frames of a 4-frame test clip"
    return True, f"PyNvVideoCodec {nvc.__version__} on {torch.cuda.get_device_name()}"


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


# --- colour conversion on the device ----------------------------------------------------------

#: (Kr, Kb) of the YCbCr matrices; PyAV/swscale use BT.601 unless the stream says BT.709
_MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722)}
#: AVColorSpace value of BT.709
_AVCOL_SPC_BT709 = 1


def matrix_of(colorspace: int | None) -> str:
    return "bt709" if colorspace == _AVCOL_SPC_BT709 else "bt601"


def nv12_to_rgb(nv12, height: int, width: int, matrix: str = "bt601"):
    """NV12 ``[h * 3 / 2, w]`` uint8 (limited range) → RGB ``[3, h, w]`` uint8, on the tensor's
    device; nearest chroma, as swscale's default conversion."""
    import torch

    kr, kb = _MATRICES[matrix]
    kg = 1.0 - kr - kb
    y = (nv12[:height].to(torch.float32) - 16.0) * (255.0 / 219.0)
    uv = nv12[height : height + height // 2].view(height // 2, width // 2, 2).to(torch.float32) - 128.0
    uv = uv * (255.0 / 224.0)
    uv = uv.repeat_interleave(2, 0).repeat_interleave(2, 1)[:height, :width]
    u, v = uv[..., 0], uv[..., 1]
    r = y + (2.0 - 2.0 * kr) * v
    b = y + (2.0 - 2.0 * kb) * u
    g = y - (2.0 * kb * (1.0 - kb) / kg) * u - (2.0 * kr * (1.0 - kr) / kg) * v
    return torch.stack((r, g, b)).round_().clamp_(0, 255).to(torch.uint8)


@functools.lru_cache(maxsize=8)
def _grey_lut(device: str):
    """Limited-range luma → full-range grey, exactly as swscale's ``gray`` output."""
    import torch

    y = torch.arange(256, dtype=torch.int32)
    return (((y - 16) * 510 + 219) // 438).clamp(0, 255).to(torch.float32).to(device)


def area_weights(src: int, dst: int) -> np.ndarray:
    """``[dst, src]`` weights of an area (box) downscale: each output pixel is the mean of the
    source pixels it covers, fractional ones weighted by their overlap (OpenCV's INTER_AREA)."""
    scale = src / dst
    w = np.zeros((dst, src), np.float64)
    for j in range(dst):
        a, b = j * scale, (j + 1) * scale
        for i in range(math.floor(a), min(src, math.ceil(b))):
            w[j, i] = max(0.0, min(b, i + 1) - max(a, i))
    return w / scale


@functools.lru_cache(maxsize=16)
def _area_pair(h: int, w: int, th: int, tw: int, device: str):
    import torch

    ah, aw = area_weights(h, th).astype(np.float64), area_weights(w, tw).astype(np.float64)
    return torch.from_numpy(ah).to(device), torch.from_numpy(aw).to(device).T


def grey_thumbnail_gpu(luma, width: int) -> np.ndarray:
    """The motion gate's thumbnail (:func:`raydetect.video.gate.grey_thumbnail`) of a frame whose
    limited-range luma plane ``[h, w]`` uint8 is on the GPU: grey conversion and area downscale
    on the device, rounded as OpenCV's uint8 INTER_AREA (integer factors: the exact block sum
    times ``float32(1 / area)``, rounded half to even; other factors: overlap-weighted means);
    only the thumbnail comes to the host."""
    import torch

    h, w = int(luma.shape[0]), int(luma.shape[1])
    height = max(1, round(h * width / w))
    dev = str(luma.device)
    grey = _grey_lut(dev)[luma.to(torch.int64)]
    if (h, w) == (height, width):
        small = grey
    elif h % height == 0 and w % width == 0:  # block sums: exact, whatever the matmul precision
        fh, fw = h // height, w // width
        sums = grey.view(height, fh, width, fw).sum(dim=(1, 3))
        small = torch.round(sums * torch.tensor(1.0 / (fh * fw), dtype=torch.float32, device=dev))
    else:  # float64 products: no TF32 whatever the process's matmul setting
        ah, aw = _area_pair(h, w, height, width, dev)
        small = torch.round((ah @ grey.double() @ aw).float())
    return small.clamp_(0, 255).cpu().numpy().astype(np.float32)


class NvdecFrame:
    """One decoded frame in GPU memory (NV12); pixels are converted on the device on request."""

    __slots__ = ("nv12", "pts", "width", "height", "matrix")

    def __init__(self, nv12, pts: int, width: int, height: int, matrix: str = "bt601") -> None:
        self.nv12 = nv12
        self.pts = pts
        self.width = width
        self.height = height
        self.matrix = matrix

    def rgb(self):
        """RGB ``[3, h, w]`` uint8 CUDA tensor (the detector's GPU stage takes it as is)."""
        return nv12_to_rgb(self.nv12, self.height, self.width, self.matrix)

    def bgr(self) -> np.ndarray:
        """HWC BGR on the host (for a detector on the CPU data path)."""
        return self.rgb().flip(0).permute(1, 2, 0).contiguous().cpu().numpy()

    def grey(self) -> np.ndarray:
        lut = _grey_lut(str(self.nv12.device))
        return lut[self.nv12[: self.height].long()].to(dtype=self.nv12.dtype).cpu().numpy()

    def thumbnail(self, width: int) -> np.ndarray:
        return grey_thumbnail_gpu(self.nv12[: self.height], width)


def _codec_enum(nvc, name: str):
    """``nvc.cudaVideoCodec.<name>`` (also spelled ``cudaVideoCodec_<name>``)."""
    enum = nvc.cudaVideoCodec
    for attr in (name, f"cudaVideoCodec_{name}"):
        if hasattr(enum, attr):
            return getattr(enum, attr)
    members = getattr(enum, "__members__", {})
    for k, v in members.items():
        if k.upper().endswith(name):
            return v
    raise NvdecUnsupported(f"PyNvVideoCodec has no cudaVideoCodec {name} ({', '.join(members)})")


class NvdecPacketDecoder:
    """A NVDEC session for one PyAV stream: ``decode(packet)`` → the :class:`NvdecFrame` s that
    the packet completes (display order, PTS = the PTS of the picture's own packet; pictures of
    packets flagged *discard* by the demuxer, i.e. outside the edit list, are dropped as FFmpeg
    drops them); a packet of size 0 (PyAV's flush packet at the end of the demux) drains the
    decoder.

    Raises :class:`NvdecUnsupported` for a codec or pixel format NVDEC does not take here."""

    def __init__(self, stream, gpu_id: int | None = None) -> None:
        cc = stream.codec_context
        codec = cc.name
        if codec not in NVDEC_CODECS:
            raise NvdecUnsupported(f"codec {codec} is not decoded by NVDEC")
        pix = cc.pix_fmt
        if pix is not None and pix not in NV12_PIX_FMTS:
            raise NvdecUnsupported(f"pixel format {pix} (only 8-bit 4:2:0 goes to NVDEC)")
        import PyNvVideoCodec as nvc
        import torch

        self.gpu_id = torch.cuda.current_device() if gpu_id is None else gpu_id
        self.device = f"cuda:{self.gpu_id}"
        self.width, self.height = int(cc.width), int(cc.height)
        self.matrix = matrix_of(getattr(cc, "colorspace", None))
        self.bsf = None
        if codec in ANNEXB_FILTERS:
            from av.bitstream import BitStreamFilterContext

            self.bsf = BitStreamFilterContext(ANNEXB_FILTERS[codec], stream)
        self._nvc = nvc
        self.decoder = nvc.CreateDecoder(gpuid=self.gpu_id, codec=_codec_enum(nvc, NVDEC_CODECS[codec]),
                                         usedevicememory=True)
        self.frames = 0
        self._discard: set[int] = set()

    def _feed(self, data: np.ndarray | None, pts: int | None) -> list:
        pkt = self._nvc.PacketData()
        if data is None or data.size == 0:
            pkt.bsl_data, pkt.bsl = 0, 0
            eos = getattr(getattr(self._nvc, "VideoPacketFlag", None), "ENDOFSTREAM", None)
            if eos is not None:
                pkt.decode_flag = eos
        else:
            pkt.bsl_data, pkt.bsl = int(data.ctypes.data), int(data.size)
        if pts is not None:
            pkt.pts = int(pts)
        return list(self.decoder.Decode(pkt))

    def decode(self, packet) -> list[NvdecFrame]:
        import torch

        if packet.size and packet.is_discard and packet.pts is not None:
            # outside the container's edit list: decoded (other pictures may refer to it) but not
            # shown, as FFmpeg's decoder drops it (the traffic clip's last packet is one)
            self._discard.add(int(packet.pts))
        if packet.size == 0:
            if self.bsf is not None:
                pending = self.bsf.filter(None)
                out = [f for p in pending for f in self._feed(np.frombuffer(p, np.uint8), p.pts)]
            else:
                out = []
            out += self._feed(None, None)
        elif self.bsf is not None:
            out = [f for p in self.bsf.filter(packet) for f in self._feed(np.frombuffer(p, np.uint8), p.pts)]
        else:
            out = self._feed(np.frombuffer(packet, np.uint8), packet.pts)
        frames = []
        for f in out:
            pts = int(f.getPTS())
            if pts in self._discard:
                self._discard.remove(pts)
                continue
            frames.append(NvdecFrame(self._nv12(f), pts, self.width, self.height, self.matrix))
        if frames:
            # the decoder reuses its output surfaces: our copies must be done before the next call
            torch.cuda.current_stream(self.device).synchronize()
        self.frames += len(frames)
        return frames

    def _nv12(self, f):
        """A torch copy (ours, so the decoder may reuse its surface) of a decoded NV12 frame,
        ``[h * 3 / 2, w]`` uint8 on the device."""
        import torch

        t = torch.from_dlpack(f)
        if t.ndim == 3 and t.shape[-1] == 1:
            t = t[..., 0]
        if t.ndim != 2 or t.shape[1] < self.width or t.shape[0] < self.height * 3 // 2:
            raise RuntimeError(f"unexpected NVDEC frame layout {tuple(t.shape)} for {self.width}x{self.height} NV12")
        if t.shape[1] != self.width:
            t = t[:, : self.width]
        return t.clone()


# --- PyNvVideoCodec's own demuxer (benchmark comparison) -----------------------------------------


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
    """Every frame of the local file ``path`` decoded by PyNvVideoCodec's ``SimpleDecoder`` (its
    own demuxer), as ``(pts, rgb)``: ``pts`` as that decoder reports it (not PyAV's PTS for
    streams with B-frames: see the module doc), ``rgb`` a host HWC uint8 RGB array when
    ``rgb_to_host``, else ``None`` (decode only). ``decoder``: an open ``SimpleDecoder`` to reuse
    (rewound to frame 0)."""
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


def open_pynvvideocodec(path: str, *, rgb: bool = False, gpu_id: int = 0) -> Any:
    """A ``PyNvVideoCodec.SimpleDecoder`` on ``path`` with device-memory output (NV12, or RGB HWC)."""
    import PyNvVideoCodec as nvc

    color = nvc.OutputColorType.RGB if rgb else nvc.OutputColorType.NATIVE
    return nvc.SimpleDecoder(str(path), gpu_id=gpu_id, use_device_memory=True, output_color_type=color)


def cuda_synchronize() -> None:
    """Wait for the GPU (torch), so that timings include all work."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except Exception:
        pass
