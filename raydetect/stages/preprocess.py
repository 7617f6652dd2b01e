"""Decode and letterbox on the CPU, with the geometry Ultralytics uses.

``letterbox`` keeps the aspect ratio, resizes with bilinear interpolation and pads
(value 114) to the model's input size, which is a multiple of the model stride;
``unletterbox_boxes`` maps boxes back to original pixel coordinates. GPU paths must
reproduce the same :class:`Letterbox` geometry (see :func:`letterbox_geometry`).
"""

from __future__ import annotations

import io
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass

import cv2
import numpy as np

PAD_VALUE = 114


class ImageError(ValueError):
    """The input is not a usable image; the message is what goes into the error column."""


def error_kind(e: BaseException) -> str:
    """The :data:`~raydetect.types.ErrorKind` of an exception raised while reading an image."""
    return "too_large" if isinstance(e, ImageTooLargeError) else "input"


class ImageTooLargeError(ImageError):
    """The input exceeds ``max_bytes`` or ``max_pixels`` (the online endpoint answers 413)."""


@dataclass(frozen=True, slots=True)
class Letterbox:
    """Geometry of one letterbox: resized size, scale and padding (pixels, left/top)."""

    ratio: float
    new_w: int
    new_h: int
    pad_left: int
    pad_top: int
    out_w: int
    out_h: int

    @property
    def gain_x(self) -> float:
        """Horizontal scale of the resize as done: rounded width / original width."""
        return self.new_w / self.orig_w if self.orig_w else self.ratio

    @property
    def gain_y(self) -> float:
        """Vertical scale of the resize as done: rounded height / original height."""
        return self.new_h / self.orig_h if self.orig_h else self.ratio

    orig_w: int = 0  # original image size (0: unknown, the single ratio is used)
    orig_h: int = 0


def letterbox_geometry(h: int, w: int, out_h: int, out_w: int) -> Letterbox:
    """Same arithmetic as Ultralytics ``LetterBox(auto=False, scaleup=True, center=True)``."""
    r = min(out_h / h, out_w / w)
    # at least one pixel: a 10000x1 image would round to 0 rows (Ultralytics fails there)
    new_w, new_h = max(1, int(round(w * r))), max(1, int(round(h * r)))
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    top = int(round(dh - 0.1))
    left = int(round(dw - 0.1))
    return Letterbox(r, new_w, new_h, left, top, out_w, out_h, orig_w=w, orig_h=h)


def letterbox(img: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, Letterbox]:
    """Letterbox an HxWx3 uint8 image into an out_h x out_w x 3 canvas."""
    h, w = img.shape[:2]
    g = letterbox_geometry(h, w, out_h, out_w)
    if (w, h) != (g.new_w, g.new_h):
        img = cv2.resize(img, (g.new_w, g.new_h), interpolation=cv2.INTER_LINEAR)
    out = np.full((out_h, out_w, 3), PAD_VALUE, dtype=np.uint8)
    out[g.pad_top : g.pad_top + g.new_h, g.pad_left : g.pad_left + g.new_w] = img
    return out, g


def to_tensor(images: list[np.ndarray]) -> np.ndarray:
    """Letterboxed BGR HxWx3 uint8 images → float32 NCHW RGB in [0, 1]."""
    batch = np.stack(images)[..., ::-1].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(batch, dtype=np.float32) * np.float32(1 / 255)


def unletterbox_boxes(boxes: np.ndarray, g: Letterbox, orig_h: int, orig_w: int) -> np.ndarray:
    """Map xyxy boxes from letterboxed to original pixel coordinates, clipped to the image
    (:func:`unletterbox_many` for one image).

    One gain per axis, from the rounded resize (``new_w / w``, ``new_h / h``), as Ultralytics
    >= 8.4's ``scale_boxes``: the single ratio ``r`` is off by up to half a letterbox pixel
    (about 1.5 px at 1080p) on the axis whose size was rounded."""
    return unletterbox_many([boxes], [g], [(orig_h, orig_w)])[0]


def unletterbox_many(boxes: list[np.ndarray], geoms: list[Letterbox], sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """:func:`unletterbox_boxes` for the boxes of many images at once (``sizes``: original
    ``(h, w)`` each): float32 arithmetic in one pass over all boxes instead of a dozen NumPy
    calls per image; returns one ``[k, 4]`` array per image."""
    n = len(boxes)
    counts = np.fromiter((len(b) for b in boxes), dtype=np.int64, count=n)
    if not counts.any():
        return [np.zeros((0, 4), np.float32) for _ in range(n)]
    out = np.concatenate([b.reshape(-1, 4) for b in boxes]).astype(np.float32, copy=False)
    # per image: pad x, pad y, gain x, gain y, width, height (float32)
    per = np.array([(g.pad_left, g.pad_top, g.gain_x, g.gain_y, w, h) for g, (h, w) in zip(geoms, sizes, strict=True)],
                   dtype=np.float64).astype(np.float32)
    rep = np.repeat(per, counts, axis=0)
    # x1, x2 and y1, y2 as strided views: in place, no fancy-indexing copies
    for v, c in ((out[:, 0::2], 0), (out[:, 1::2], 1)):
        v -= rep[:, c : c + 1]
        v /= rep[:, c + 2 : c + 3]
        np.minimum(np.maximum(v, np.float32(0), out=v), rep[:, c + 4 : c + 5], out=v)  # np.clip, faster
    return np.split(out, np.cumsum(counts)[:-1])


def letterbox_boxes(boxes: np.ndarray, g: Letterbox) -> np.ndarray:
    """Inverse of :func:`unletterbox_boxes` (without clipping); used by tests and calibration."""
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] *= np.float32(g.gain_x)
    out[:, [1, 3]] *= np.float32(g.gain_y)
    out[:, [0, 2]] += g.pad_left
    out[:, [1, 3]] += g.pad_top
    return out


# --- decoding ---------------------------------------------------------------------------

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"


def _jpeg_has_eoi(data: bytes) -> bool:
    """True if the JPEG has its end-of-image marker. Walks the marker segments up to the
    first start-of-scan (so an EXIF thumbnail's own EOI does not count), then looks for
    FFD9, which entropy-coded data cannot contain (FF is stuffed as FF00). Data after the
    EOI is allowed (many cameras and tools append some)."""
    n, pos = len(data), 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return data.rfind(b"\xff\xd9") >= 0  # not a marker: let the decoder judge the structure
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return True
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xDA:
            # searched from the end, where the EOI is: a forward search reads every byte of the
            # entropy-coded data (60-120 us per 640x480 JPEG here, the largest host cost per image of
            # the GPU path); the answer, whether there is one, is the same
            return data.rfind(b"\xff\xd9", pos + 2) >= 0
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return False


def _png_has_iend(data: bytes) -> bool:
    """True if the PNG's chunks, walked by length, reach IEND within the data (data after
    IEND is allowed)."""
    n, pos = len(data), 8
    while pos + 8 <= n:
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IEND":
            return True
        pos += 12 + length
    return False


def check_encoded(data: bytes, max_bytes: int) -> None:
    """Cheap structural checks before decoding. Raises :class:`ImageError`."""
    if len(data) == 0:
        raise ImageError("empty file")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"file too large: {len(data)} bytes > max_bytes {max_bytes}")
    # OpenCV decodes a truncated JPEG/PNG as a partly grey image without an error: catch
    # truncation here from the missing end marker.
    if data.startswith(_JPEG) and not _jpeg_has_eoi(data):
        raise ImageError("truncated JPEG: no end-of-image marker")
    if data.startswith(_PNG) and not _png_has_iend(data):
        raise ImageError("truncated PNG: no IEND chunk")


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the header alone, or None if Pillow cannot parse it."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Image.DecompressionBombError:
        # Pillow refuses to even open huge images; its message has the size.
        raise ImageTooLargeError("image too large for Pillow's decompression-bomb limit") from None
    except Exception:
        return None


def check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise ImageTooLargeError(f"image too large: {w}x{h} = {w * h} pixels > max_pixels {max_pixels}")


def decode_image(data: bytes, max_pixels: int, max_bytes: int) -> np.ndarray:
    """Encoded bytes → HxWx3 BGR uint8. Raises :class:`ImageError` with a clear message
    for empty, oversized, truncated or non-image input."""
    check_encoded(data, max_bytes)
    size = image_size(data)
    if size is not None:
        check_pixels(size[0], size[1], max_pixels)
    img, report = _imdecode_reporting(data)
    if img is None:
        raise ImageError("cannot decode: not an image or corrupt data" + (f" ({report})" if report else ""))
    if report and _FATAL_WARNING.search(report):
        raise ImageError(f"corrupt image data: {report}")
    check_pixels(img.shape[1], img.shape[0], max_pixels)
    return img


#: libjpeg/libpng warnings after which the decoded pixels are not the image (OpenCV still
#: returns an array: the damaged part is grey or garbage)
_FATAL_WARNING = re.compile(r"Corrupt JPEG data|Premature end of JPEG|libpng error|CRC error", re.I)
_stderr_lock = threading.Lock()
_capture: tempfile.TemporaryFile | None = None


def _imdecode_reporting(data: bytes) -> tuple[np.ndarray | None, str]:
    """``cv2.imdecode`` plus what its codec (libjpeg, libpng) wrote to stderr, which is the
    only way OpenCV reports a mid-file corruption it decoded past. File descriptor 2 is
    pointed at a scratch file for the call (under a lock: decodes in one process take turns
    here; inference in other threads is not held up)."""
    global _capture
    buf = np.frombuffer(data, dtype=np.uint8)
    if not (data.startswith(_JPEG) or data.startswith(_PNG)):
        return cv2.imdecode(buf, cv2.IMREAD_COLOR), ""
    with _stderr_lock:
        if _capture is None:
            _capture = tempfile.TemporaryFile()
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            _capture.seek(0)
            _capture.truncate()
            os.dup2(_capture.fileno(), 2)
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        _capture.seek(0)
        text = _capture.read(4096).decode("utf-8", "replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    report = "; ".join(lines[:3])
    if report and not _FATAL_WARNING.search(report):
        sys.stderr.write(text)  # a harmless codec warning: keep it visible
    return img, report[:300]


def as_bgr(img: np.ndarray) -> np.ndarray:
    """Accept HxW (grey), HxWx3 (BGR) or HxWx4 (BGRA) uint8 arrays."""
    if img.dtype != np.uint8:
        raise ImageError(f"array images must be uint8, got {img.dtype}")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 3:
        return img
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    raise ImageError(f"array images must be HxW, HxWx3 or HxWx4, got shape {img.shape}")
