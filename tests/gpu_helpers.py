"""Inputs and comparisons shared by the torch-engine tests (CPU) and the GPU tests."""

from __future__ import annotations

import io

import cv2
import numpy as np

from raydetect.stages.preprocess import decode_image, letterbox, to_tensor
from tests.conftest import photo_paths

BIG = 10**9


def photo_bytes() -> list[bytes]:
    return [p.read_bytes() for p in photo_paths()]


def letterboxed_photos(n: int | None = None, size: int = 640) -> np.ndarray:
    """The real photos through the CPU path: float32 NCHW batch."""
    imgs = [decode_image(b, BIG, BIG) for b in photo_bytes()[:n]]
    return to_tensor([letterbox(im, size, size)[0] for im in imgs])


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert np.isfinite(out).all()
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def synthetic_head(layout: str, rng: np.random.Generator, b: int = 4, n: int = 3000, nc: int = 5) -> np.ndarray:
    """Random raw head outputs with many overlapping boxes (exercises NMS hard)."""
    xy = rng.uniform(0, 640, (b, n, 2))
    wh = rng.uniform(5, 120, (b, n, 2))
    cls = rng.random((b, n, nc)) ** 3
    if layout == "yolov8":
        return np.concatenate([xy, wh, cls], -1).transpose(0, 2, 1).astype(np.float32)
    obj = rng.random((b, n, 1))
    return np.concatenate([xy, wh, obj, cls], -1).astype(np.float32)


def assert_rows_equal(got, ref) -> None:
    """(boxes, scores, classes) from two NMS implementations: the same detections, in order."""
    gb, gs, gc = got
    rb, rs, rc = ref
    assert len(gb) == len(rb), f"{len(gb)} vs {len(rb)} detections"
    np.testing.assert_array_equal(gc, rc)
    np.testing.assert_allclose(gb, rb, rtol=0, atol=1e-4)
    np.testing.assert_allclose(gs, rs, rtol=1e-6, atol=0)


def bad_inputs(good: bytes) -> dict[str, object]:
    """One of each kind of bad input, by name."""
    return {
        "empty": b"",
        "text": b"this is a text file, not a JPEG\n" * 20,
        "truncated": good[: len(good) // 3],
        "jpeg_header_garbage": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8 + b"\xff\xd9",
        "float_array": np.zeros((8, 8, 3), np.float32),
        "bad_shape_array": np.zeros((8, 8, 5), np.uint8),
    }


def huge_jpeg() -> bytes:
    return cv2.imencode(".jpg", np.full((2500, 2500, 3), 90, np.uint8))[1].tobytes()


def expected_error(img: object, max_pixels: int, max_bytes: int) -> str | None:
    """What the CPU path's Detector writes into the error column for ``img``."""
    from raydetect.stages.preprocess import ImageError, as_bgr

    try:
        if isinstance(img, np.ndarray) and img.ndim in (2, 3):
            as_bgr(img)
        else:
            decode_image(bytes(img), max_pixels, max_bytes)
    except ImageError as e:
        return str(e)
    except Exception as e:
        return f"decode failed: {type(e).__name__}: {e}"
    return None


def variant_jpegs(src: bytes) -> dict[str, bytes]:
    """The same photo as JPEG variants the GPU decoder must handle or hand to the CPU."""
    from PIL import Image

    im = Image.open(io.BytesIO(src)).convert("RGB")
    out: dict[str, bytes] = {}
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90)
    out["baseline"] = b.getvalue()
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90, progressive=True)
    out["progressive"] = b.getvalue()
    b = io.BytesIO()
    im.convert("L").save(b, "JPEG", quality=90)
    out["grey"] = b.getvalue()
    b = io.BytesIO()
    im.convert("CMYK").save(b, "JPEG", quality=90)
    out["cmyk"] = b.getvalue()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display: OpenCV applies it
    b = io.BytesIO()
    im.save(b, "JPEG", quality=90, exif=exif)
    out["exif_rotated"] = b.getvalue()
    b = io.BytesIO()
    im.save(b, "PNG")
    out["png"] = b.getvalue()
    return out
