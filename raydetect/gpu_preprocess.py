"""Decode and letterbox on the GPU: JPEG bytes → nvJPEG (batched) → letterboxed NCHW tensor.

Only the compressed bytes cross PCIe for JPEGs. Everything else falls back to the CPU decoder
of :mod:`raydetect.preprocess` *for that image only*: other formats (PNG, WebP, …), JPEGs that
OpenCV would rotate (EXIF orientation) or that are not RGB/grey (CMYK), and JPEGs nvJPEG fails
on. Validation is the CPU path's (``check_encoded``, pixel limits read from the header), so bad
input gives the same error text on both paths.

The letterbox reproduces :func:`raydetect.preprocess.letterbox`: same geometry
(:func:`letterbox_geometry`), bilinear resize without antialiasing (as ``cv2.INTER_LINEAR``),
rounded to whole grey levels like OpenCV's uint8 output, pad 114, RGB, scaled to [0, 1].
Images of the same size are resized together.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

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


def probe_jpeg(data: bytes) -> tuple[int, int, bool] | None:
    """(width, height, nvJPEG can decode it like OpenCV) from the JPEG header, or None if
    Pillow cannot parse it. Raises :class:`ImageTooLargeError` for decompression bombs."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            ok = im.format == "JPEG" and im.mode in ("RGB", "L")
            if ok:
                # OpenCV applies EXIF orientation when decoding; nvJPEG does not.
                ok = im.getexif().get(_EXIF_ORIENTATION, 1) == 1
            return w, h, ok
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
    ) -> None:
        self.imgsz = imgsz
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.nvjpeg = self.device.type == "cuda" if nvjpeg is None else nvjpeg
        if self.nvjpeg and self.device.type != "cuda":
            raise ValueError("nvjpeg needs a CUDA device")

    # --- decoding -------------------------------------------------------------------------
    def _upload_cpu(self, data: bytes | np.ndarray) -> torch.Tensor:
        arr = as_bgr(data) if isinstance(data, np.ndarray) else decode_image(data, self.max_pixels, self.max_bytes)
        rgb = np.ascontiguousarray(arr[..., ::-1].transpose(2, 0, 1))
        return torch.from_numpy(rgb).to(self.device)

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
        for i, img in enumerate(images):
            try:
                if isinstance(img, np.ndarray) and img.ndim in (2, 3):
                    decoded[i] = self._cpu(img, res, i)
                    continue
                data = img if isinstance(img, bytes) else bytes(img)
                if self.nvjpeg and data.startswith(_JPEG):
                    check_encoded(data, self.max_bytes)
                    probe = probe_jpeg(data)
                    if probe is not None:
                        check_pixels(probe[0], probe[1], self.max_pixels)
                        if probe[2]:
                            gpu.append(i)
                            gpu_bytes.append(data)
                            continue
                decoded[i] = self._cpu(data, res, i)
            except ImageError as e:
                res.errors[i] = str(e)
            except Exception as e:  # a decoder bug must not kill the batch
                res.errors[i] = f"decode failed: {type(e).__name__}: {e}"
        if gpu:
            for i, t, data in zip(gpu, self._nvjpeg(gpu_bytes, res), gpu_bytes, strict=True):
                try:
                    if t is None:  # nvJPEG refused it: this image goes through the CPU decoder
                        t = self._cpu(data, res, i)
                    else:
                        check_pixels(int(t.shape[2]), int(t.shape[1]), self.max_pixels)
                        res.decoder[i] = "nvjpeg"
                    decoded[i] = t
                except ImageError as e:
                    res.errors[i] = str(e)
                except Exception as e:
                    res.errors[i] = f"decode failed: {type(e).__name__}: {e}"
        for i, t in enumerate(decoded):
            if t is not None:
                res.sizes[i] = (int(t.shape[1]), int(t.shape[2]))
        return decoded, res

    def _cpu(self, data: bytes | np.ndarray, res: PreparedBatch, i: int) -> torch.Tensor:
        t = self._upload_cpu(data)
        res.cpu_decoded += 1
        res.h2d_bytes += t.numel()
        res.decoder[i] = "cpu"
        return t

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
