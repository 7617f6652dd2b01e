"""Decode and letterbox on the GPU: JPEG bytes → nvJPEG (batched) → letterboxed NCHW tensor.

Only the compressed bytes cross PCIe for baseline JPEGs (decoded by the GPU's hardware JPEG
engines where it has them). Everything else goes to the CPU decoder of
:mod:`raydetect.preprocess` *for that image only*, in a thread pool while nvJPEG decodes the rest:
other formats (PNG, WebP, …), JPEGs that OpenCV would rotate (EXIF orientation) or that are not
YCbCr/grey (CMYK, Adobe transform), progressive JPEGs (nvJPEG decodes them one by one with
Huffman decoding on the CPU and uploads the DCT coefficients: slower than OpenCV and more bytes
than the pixels; ``progressive_on_gpu=True`` sends them to nvJPEG anyway), and JPEGs nvJPEG
fails on. Validation is the CPU path's (``check_encoded``, pixel limits read from the header,
Pillow's decompression-bomb limit), so bad input gives the same error text on both paths.

The letterbox reproduces :func:`raydetect.preprocess.letterbox`: same geometry
(:func:`letterbox_geometry`), bilinear resize without antialiasing (as ``cv2.INTER_LINEAR``),
rounded to whole grey levels like OpenCV's uint8 output, pad 114, RGB, scaled to [0, 1].
Images of the same size are resized together.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from raydetect.preprocess import (
    PAD_VALUE,
    ImageError,
    ImageTooLargeError,
    Letterbox,
    as_bgr,
    check_encoded,
    check_pixels,
    decode_image,
    letterbox_geometry,
)

# torch.frombuffer over immutable ``bytes`` (nvJPEG only reads them) and torchvision's
# deprecation notice for its decoders would otherwise warn on every batch.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
warnings.filterwarnings("ignore", message=r".*decod.*deprecated.*", category=UserWarning)

_JPEG = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112
#: start-of-frame markers (not DHT C4, JPG C8, DAC CC); progressive ones need nvJPEG's slow
#: hybrid path (Huffman on the CPU, then the coefficients uploaded), so they go to the CPU.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_SOF_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}


class JpegInfo(NamedTuple):
    width: int
    height: int
    gpu_ok: bool  # nvJPEG decodes it as OpenCV would (YCbCr/grey, no EXIF rotation)
    progressive: bool


def _exif_orientation(tiff: bytes) -> int:
    """The Orientation tag of IFD0 of an EXIF (TIFF) block; 1 if absent or unreadable."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 1
    order = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return 1
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for k in range(count):
        e = ifd + 2 + 12 * k
        if e + 12 > len(tiff):
            break
        if int.from_bytes(tiff[e : e + 2], order) == _EXIF_ORIENTATION:
            return int.from_bytes(tiff[e + 8 : e + 10], order)
    return 1


def parse_jpeg_header(data: bytes) -> JpegInfo | None:
    """Size, decodability and progressiveness from the JPEG markers before the first scan
    (a few microseconds); None when the header is not plain enough to be sure."""
    n, i = len(data), 2
    orientation, adobe, sof = 1, False, None
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:  # fill byte
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:  # markers without a length
            i += 2
            continue
        if m in (0xD9, 0xDA):  # end of image / start of scan: the header is over
            break
        seg = int.from_bytes(data[i + 2 : i + 4], "big")
        if seg < 2 or i + 2 + seg > n:
            return None
        body = data[i + 4 : i + 2 + seg]
        if m in _SOF:
            if len(body) < 6:
                return None
            h, w, comps = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
            sof = (w, h, comps, m in _SOF_PROGRESSIVE)
        elif m == 0xE1 and body[:6] == b"Exif\x00\x00" and orientation == 1:
            orientation = _exif_orientation(body[6:])
        elif m == 0xEE and body[:5] == b"Adobe":
            adobe = True  # colour transform flag: leave it to libjpeg
        i += 2 + seg
    if sof is None or sof[0] == 0 or sof[1] == 0:
        return None
    w, h, comps, progressive = sof
    return JpegInfo(w, h, comps in (1, 3) and not adobe and orientation == 1, progressive)


def probe_jpeg(data: bytes) -> JpegInfo | None:
    """:func:`parse_jpeg_header`, or Pillow when that cannot tell; None if neither can parse
    it. Raises :class:`ImageTooLargeError` where the CPU path's Pillow check would."""
    from PIL import Image

    info = parse_jpeg_header(data)
    if info is not None:
        if info.width * info.height > 2 * Image.MAX_IMAGE_PIXELS:  # Pillow's bomb check
            raise ImageTooLargeError("image too large for Pillow's decompression-bomb limit")
        return info
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            ok = im.format == "JPEG" and im.mode in ("RGB", "L")
            if ok:
                # OpenCV applies EXIF orientation when decoding; nvJPEG does not.
                ok = im.getexif().get(_EXIF_ORIENTATION, 1) == 1
            prog = bool(im.info.get("progressive") or im.info.get("progression"))
            return JpegInfo(w, h, ok, prog)
    except Image.DecompressionBombError:
        raise ImageTooLargeError("image too large for Pillow's decompression-bomb limit") from None
    except Exception:
        return None


def letterbox_tensors(
    images: Sequence[torch.Tensor], out_h: int, out_w: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, list[Letterbox]]:
    """RGB ``[3, h, w]`` uint8 tensors (one device) → ``[n, 3, out_h, out_w]`` in [0, 1] and
    the geometry of each, exactly as the CPU letterbox (to within one grey level)."""
    n = len(images)
    device = images[0].device
    out = torch.full((n, 3, out_h, out_w), PAD_VALUE / 255.0, dtype=dtype, device=device)
    geoms: list[Letterbox | None] = [None] * n
    groups: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault((int(im.shape[1]), int(im.shape[2])), []).append(i)
    for (h, w), idx in groups.items():
        g = letterbox_geometry(h, w, out_h, out_w)
        x = images[idx[0]][None] if len(idx) == 1 else torch.stack([images[i] for i in idx])
        x = x.to(torch.float32)
        if (g.new_w, g.new_h) != (w, h):
            x = F.interpolate(x, size=(g.new_h, g.new_w), mode="bilinear", align_corners=False, antialias=False)
            x = x.round_().clamp_(0, 255)
        x = x.mul_(1.0 / 255.0)
        rows = torch.as_tensor(idx, device=device)
        out[rows, :, g.pad_top : g.pad_top + g.new_h, g.pad_left : g.pad_left + g.new_w] = x.to(dtype)
        for i in idx:
            geoms[i] = g
    return out, geoms  # type: ignore[return-value]


@dataclass
class PreparedBatch:
    """The GPU-ready part of a list of inputs, and what happened to each input."""

    tensor: torch.Tensor | None  # [k, 3, H, W] letterboxed, k = len(rows)
    rows: list[int]  # input positions of the tensor's rows
    geoms: list[Letterbox]  # per row
    sizes: list[tuple[int, int] | None]  # per input: original (height, width)
    errors: list[str | None]  # per input
    decoder: list[str | None] = field(default_factory=list)  # per input: "nvjpeg", "cpu" or None
    h2d_bytes: int = 0  # bytes this batch uploaded: JPEG bytes for nvJPEG, pixels otherwise
    nvjpeg: int = 0  # images decoded by nvJPEG
    cpu_decoded: int = 0  # images decoded on the CPU (fallbacks and non-JPEG)
    notes: list[str] = field(default_factory=list)


class GpuPreprocessor:
    """Decode + letterbox a list of images (encoded bytes or uint8 BGR arrays) on ``device``.

    ``nvjpeg=None`` uses nvJPEG when the device is CUDA; on the CPU (tests) every image takes
    the CPU decoder and only the letterbox runs in torch."""

    def __init__(
        self,
        imgsz: tuple[int, int],
        device: str | torch.device = "cuda",
        dtype: torch.dtype | None = None,
        max_pixels: int = 40_000_000,
        max_bytes: int = 64 * 1024 * 1024,
        nvjpeg: bool | None = None,
        progressive_on_gpu: bool = False,
        cpu_threads: int | None = None,
    ) -> None:
        self.imgsz = imgsz
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.nvjpeg = self.device.type == "cuda" if nvjpeg is None else nvjpeg
        if self.nvjpeg and self.device.type != "cuda":
            raise ValueError("nvjpeg needs a CUDA device")
        self.progressive_on_gpu = progressive_on_gpu
        #: CPU decodes (fallbacks) run in these threads (OpenCV releases the GIL), while
        #: nvJPEG decodes the rest of the batch.
        self.cpu_threads = cpu_threads if cpu_threads is not None else min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    # --- decoding -------------------------------------------------------------------------
    def _decode_cpu(self, data: bytes | np.ndarray) -> np.ndarray:
        """The CPU path's decoder (BGR); runs in the thread pool."""
        if isinstance(data, np.ndarray):
            return as_bgr(data)
        return decode_image(data, self.max_pixels, self.max_bytes)

    def _upload(self, bgr: np.ndarray, res: PreparedBatch, i: int) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1].transpose(2, 0, 1))).to(self.device)
        res.cpu_decoded += 1
        res.h2d_bytes += t.numel()
        res.decoder[i] = "cpu"
        return t

    def _submit(self, jobs: list[tuple[int, bytes | np.ndarray]]):
        if len(jobs) > 1 and self.cpu_threads > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.cpu_threads, thread_name_prefix="raydetect-decode")
            return [(i, self._pool.submit(self._decode_cpu, d)) for i, d in jobs]
        return [(i, d) for i, d in jobs]

    def _collect(self, jobs, decoded: list, res: PreparedBatch) -> None:
        for i, job in jobs:
            try:
                bgr = job.result() if isinstance(job, Future) else self._decode_cpu(job)
                decoded[i] = self._upload(bgr, res, i)
            except ImageError as e:
                res.errors[i] = str(e)
            except Exception as e:  # a decoder bug must not kill the batch
                res.errors[i] = f"decode failed: {type(e).__name__}: {e}"

    def decode(
        self, images: Sequence[bytes | bytearray | memoryview | np.ndarray]
    ) -> tuple[list[torch.Tensor | None], PreparedBatch]:
        """Decode every input: (RGB ``[3, h, w]`` uint8 tensor or None per input, the report
        with ``tensor`` still None; see :meth:`prepare`)."""
        n = len(images)
        decoded: list[torch.Tensor | None] = [None] * n
        res = PreparedBatch(None, [], [], [None] * n, [None] * n, [None] * n)
        gpu: list[int] = []
        gpu_bytes: list[bytes] = []
        cpu: list[tuple[int, bytes | np.ndarray]] = []
        for i, img in enumerate(images):
            try:
                if isinstance(img, np.ndarray) and img.ndim in (2, 3):
                    cpu.append((i, img))
                    continue
                data = img if isinstance(img, bytes) else bytes(img)
                if self.nvjpeg and data.startswith(_JPEG):
                    check_encoded(data, self.max_bytes)
                    info = probe_jpeg(data)
                    if info is not None:
                        check_pixels(info.width, info.height, self.max_pixels)
                        if info.gpu_ok and (self.progressive_on_gpu or not info.progressive):
                            gpu.append(i)
                            gpu_bytes.append(data)
                            continue
                cpu.append((i, data))
            except ImageError as e:
                res.errors[i] = str(e)
            except Exception as e:  # a decoder bug must not kill the batch
                res.errors[i] = f"decode failed: {type(e).__name__}: {e}"
        jobs = self._submit(cpu)  # CPU decodes run while nvJPEG works
        if gpu:
            refused = []
            for i, t, data in zip(gpu, self._nvjpeg(gpu_bytes, res), gpu_bytes, strict=True):
                if t is None:  # nvJPEG refused it: this image goes through the CPU decoder
                    refused.append((i, data))
                    continue
                try:
                    check_pixels(int(t.shape[2]), int(t.shape[1]), self.max_pixels)
                    decoded[i] = t
                    res.decoder[i] = "nvjpeg"
                except ImageError as e:
                    res.errors[i] = str(e)
            jobs += self._submit(refused)
        self._collect(jobs, decoded, res)
        for i, t in enumerate(decoded):
            if t is not None:
                res.sizes[i] = (int(t.shape[1]), int(t.shape[2]))
        return decoded, res

    def _nvjpeg(self, datas: list[bytes], res: PreparedBatch) -> list[torch.Tensor | None]:
        """Batched nvJPEG decode; on failure, one by one, None for those that still fail."""
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [torch.frombuffer(d, dtype=torch.uint8) for d in datas]
        try:
            out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)
            res.nvjpeg += len(out)
            res.h2d_bytes += sum(len(d) for d in datas)
            return list(out)
        except Exception as e:
            res.notes.append(f"batched nvJPEG decode failed ({type(e).__name__}: {e}); one by one")
        single: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                single.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
                res.nvjpeg += 1
                res.h2d_bytes += t.numel()
            except Exception:
                single.append(None)
        return single

    # --- decode + letterbox ---------------------------------------------------------------
    def prepare(self, images: Sequence[bytes | bytearray | memoryview | np.ndarray]) -> PreparedBatch:
        decoded, res = self.decode(images)
        res.rows = [i for i, t in enumerate(decoded) if t is not None]
        if res.rows:
            h, w = self.imgsz
            res.tensor, res.geoms = letterbox_tensors([decoded[i] for i in res.rows], h, w, self.dtype)
        return res
