"""Decode and letterbox on the GPU: JPEG bytes → nvJPEG (batched) → letterboxed NCHW tensor.

Only the compressed bytes cross PCIe for baseline JPEGs (decoded by the GPU's hardware JPEG
engines where it has them). Everything else goes to the CPU decoder of
:mod:`raydetect.stages.preprocess` *for that image only*, in a thread pool while nvJPEG decodes the rest:
other formats (PNG, WebP, …), JPEGs that OpenCV would rotate (EXIF orientation) or that are not
YCbCr/grey (CMYK, Adobe transform), progressive JPEGs (nvJPEG decodes them one by one with
Huffman decoding on the CPU and uploads the DCT coefficients: slower than OpenCV and more bytes
than the pixels; ``progressive_on_gpu=True`` sends them to nvJPEG anyway), and JPEGs nvJPEG
fails on. Validation is the CPU path's (``check_encoded``, pixel limits read from the header,
Pillow's decompression-bomb limit), so bad input gives the same error text on both paths.

The letterbox reproduces :func:`raydetect.stages.preprocess.letterbox`: same geometry
(:func:`letterbox_geometry`), bilinear resize without antialiasing (as ``cv2.INTER_LINEAR``),
rounded to whole grey levels like OpenCV's uint8 output, pad 114, RGB, scaled to [0, 1].
Images of the same size are resized together.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from raydetect.stages.base import PreparedBatch
from raydetect.stages.preprocess import (
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

__all__ = ["GPU_DECODERS", "GpuPreprocessor", "PreparedBatch", "letterbox_tensors", "nvimgcodec_status"]

#: JPEG decoders of the GPU path: nvImageCodec (the GPU's hardware JPEG engines, NVJPG, with its
#: CUDA decoder as fallback; what ``auto`` picks where it is installed), torchvision's nvJPEG (CUDA
#: kernels on the SMs; ``auto`` elsewhere), or none (every image on the CPU). One nvImageCodec
#: decoder object must not decode from two threads at once ("nvjpeg error #6" in a threaded Ray
#: actor): each thread gets a decoder of its own. Measured in the Ray job on one H100
#: (benchmarks/results/gpu_pipeline.md, 2026-12-07): 3 actors x 2 threads 4,252 images/s with
#: nvImageCodec vs 3,298 with nvJPEG (the hardware decode leaves the SMs to the engine), equal at
#: 4 actors (host-bound); in one thread of one process nvImageCodec was ~10 % slower.
GPU_DECODERS = ("auto", "nvimgcodec", "nvjpeg", "cpu")


def _preload_nvjpeg() -> None:
    """nvImageCodec's nvJPEG extension dlopens ``libnvjpeg.so.13``; the ``nvidia-nvjpeg`` wheel
    puts it in ``nvidia/cu13/lib``, which is on no library path. Loading it first (by path)
    lets the extension find it by its soname, without LD_LIBRARY_PATH."""
    import ctypes
    import glob
    import sys

    for base in sys.path:
        for lib in sorted(glob.glob(os.path.join(base or ".", "nvidia", "cu1*", "lib", "libnvjpeg.so.1*"))):
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
                return
            except OSError:
                continue


_NVIMGCODEC: list[str | None] = []  # the cached answer of nvimgcodec_status


def nvimgcodec_status() -> str | None:
    """None when nvImageCodec can decode JPEGs here, else why not."""
    if _NVIMGCODEC:
        return _NVIMGCODEC[0]
    why = None
    try:
        _preload_nvjpeg()
        from nvidia import nvimgcodec

        if not torch.cuda.is_available():
            why = "no CUDA device"
        else:
            # the nvJPEG extension registers only when libnvjpeg loads: ask for a decoder of it
            nvimgcodec.Decoder(backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY),
                                         nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)])
    except Exception as e:  # ImportError, or its libraries missing
        why = f"nvImageCodec is not usable ({type(e).__name__}: {e}); pip install 'raydetect[nvimgcodec]'"
    _NVIMGCODEC.append(why)
    return why

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
        # consecutive rows (one size group: the usual case) as a slice; otherwise an index
        # tensor copied without blocking the host (a pageable copy would wait for the stream)
        if idx[-1] - idx[0] + 1 == len(idx):
            rows = slice(idx[0], idx[-1] + 1)
        else:
            rows = torch.tensor(idx)
            rows = rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows
        out[rows, :, g.pad_top : g.pad_top + g.new_h, g.pad_left : g.pad_left + g.new_w] = x.to(dtype)
        for i in idx:
            geoms[i] = g
    return out, geoms  # type: ignore[return-value]


class GpuPreprocessor:
    """Decode + letterbox a list of images (encoded bytes, uint8 BGR arrays, or RGB ``[3, h, w]``
    uint8 tensors already on the device, e.g. decoded video frames) on ``device``.

    ``decoder``: ``auto`` picks nvImageCodec on a CUDA device where it is installed, else
    torchvision's nvJPEG; ``cpu`` (and any decoder on a CPU device, for tests) sends every
    image to the CPU decoder, and only the letterbox runs in torch. ``nvjpeg=False`` is the old
    spelling of ``decoder='cpu'``."""

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
        decoder: str = "auto",
    ) -> None:
        self.imgsz = imgsz
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        if decoder not in GPU_DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(GPU_DECODERS)} (got {decoder!r})")
        if nvjpeg is False:
            decoder = "cpu"
        if decoder != "cpu" and self.device.type != "cuda":
            if nvjpeg or decoder != "auto":
                raise ValueError(f"decoder {decoder!r} needs a CUDA device")
            decoder = "cpu"
        if decoder == "auto":
            decoder = "nvimgcodec" if nvimgcodec_status() is None else "nvjpeg"
        elif decoder == "nvimgcodec" and (why := nvimgcodec_status()) is not None:
            raise ValueError(why)
        #: the GPU JPEG decoder in use: "nvimgcodec", "nvjpeg" or "cpu" (none)
        self.decoder = decoder
        # nvImageCodec decoder and its decode parameters, one per thread, made at its first use: one
        # decoder must not decode from two threads at once ("nvjpeg error #6" in a threaded actor),
        # and a lock around a shared one made the threads of an actor take turns
        self._nvimg = threading.local()
        self.progressive_on_gpu = progressive_on_gpu
        #: CPU decodes (fallbacks) run in these threads (OpenCV releases the GIL), while
        #: nvJPEG decodes the rest of the batch.
        self.cpu_threads = cpu_threads if cpu_threads is not None else min(8, os.cpu_count() or 1)
        self._pool: ThreadPoolExecutor | None = None

    @property
    def nvjpeg(self) -> bool:
        """Whether JPEGs go to a GPU decoder."""
        return self.decoder != "cpu"

    @nvjpeg.setter
    def nvjpeg(self, on: bool) -> None:
        if not on:
            self.decoder = "cpu"
        elif self.decoder == "cpu":
            self.decoder = "nvjpeg"

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
            except Exception as e:  # ImageError, or a decoder bug: it must not kill the batch
                res.fail(i, e)

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
                if isinstance(img, torch.Tensor):  # RGB [3, h, w] uint8 pixels (video frames)
                    if img.ndim != 3 or img.shape[0] != 3 or img.dtype != torch.uint8:
                        raise ImageError(f"a tensor input must be RGB [3, h, w] uint8 (got {tuple(img.shape)} {img.dtype})")
                    check_pixels(int(img.shape[2]), int(img.shape[1]), self.max_pixels)
                    decoded[i] = img.to(self.device)
                    res.decoder[i] = "tensor"
                    continue
                if isinstance(img, np.ndarray) and img.ndim in (2, 3):
                    cpu.append((i, img))
                    continue
                data = img if isinstance(img, bytes) else bytes(img)
                if self.decoder != "cpu" and data.startswith(_JPEG):
                    check_encoded(data, self.max_bytes)
                    info = probe_jpeg(data)
                    if info is not None:
                        check_pixels(info.width, info.height, self.max_pixels)
                        if info.gpu_ok and (self.progressive_on_gpu or not info.progressive):
                            gpu.append(i)
                            gpu_bytes.append(data)
                            continue
                cpu.append((i, data))
            except Exception as e:  # ImageError, or a decoder bug: it must not kill the batch
                res.fail(i, e)
        jobs = self._submit(cpu)  # CPU decodes run while nvJPEG works
        if gpu:
            refused = []
            gpu_decode = self._nvimgcodec if self.decoder == "nvimgcodec" else self._nvjpeg
            for i, t, data in zip(gpu, gpu_decode(gpu_bytes, res), gpu_bytes, strict=True):
                if t is None:  # the GPU decoder refused it: this image goes through the CPU decoder
                    refused.append((i, data))
                    continue
                try:
                    check_pixels(int(t.shape[2]), int(t.shape[1]), self.max_pixels)
                    decoded[i] = t
                    res.decoder[i] = self.decoder
                except ImageError as e:
                    res.fail(i, e)
            jobs += self._submit(refused)
        self._collect(jobs, decoded, res)
        for i, t in enumerate(decoded):
            if t is not None:
                res.sizes[i] = (int(t.shape[1]), int(t.shape[2]))
        return decoded, res

    def _nvimgcodec(self, datas: list[bytes], res: PreparedBatch) -> list[torch.Tensor | None]:
        """Batched decode by nvImageCodec (hardware JPEG engines first, its CUDA decoder for
        what they do not take) straight to planar RGB on the device, ordered on the current
        stream; None for images it cannot decode."""
        from nvidia import nvimgcodec

        if getattr(self._nvimg, "dec", None) is None:
            dec = nvimgcodec.Decoder(
                device_id=self.device.index if self.device.index is not None else torch.cuda.current_device(),
                backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY),
                          nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)],
            )
            # as OpenCV's output: no EXIF rotation (those JPEGs go to the CPU anyway), sRGB, uint8
            params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                             allow_any_depth=False, sample_format=nvimgcodec.SampleFormat.P_RGB)
            self._nvimg.dec, self._nvimg.params = dec, params
        dec, params = self._nvimg.dec, self._nvimg.params
        stream = torch.cuda.current_stream(self.device)
        try:
            imgs = dec.decode([nvimgcodec.CodeStream(d) for d in datas], params=params,
                              cuda_stream=stream.cuda_stream)
        except Exception as e:
            res.notes.append(f"nvImageCodec batch decode failed ({type(e).__name__}: {e}); trying nvJPEG")
            return self._nvjpeg(datas, res)
        out: list[torch.Tensor | None] = []
        for img, d in zip(imgs, datas, strict=True):
            if img is None:
                out.append(None)
                continue
            t = torch.from_dlpack(img)  # planar RGB: [3, h, w] uint8 on the device
            if t.ndim != 3 or t.shape[0] != 3:
                out.append(None)
                continue
            out.append(t)
            res.nvjpeg += 1
            res.h2d_bytes += len(d)
        return out

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
