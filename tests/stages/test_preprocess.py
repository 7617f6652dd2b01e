"""Letterbox geometry, box round trips and the decode error messages."""

import io

import cv2
import numpy as np
import pytest

from raydetect.stages.preprocess import (
    PAD_VALUE,
    ImageError,
    decode_image,
    letterbox,
    letterbox_boxes,
    letterbox_geometry,
    to_tensor,
    unletterbox_boxes,
    unletterbox_many,
)
from tests.conftest import photo_paths


@pytest.mark.parametrize("h,w", [(144, 780), (720, 1280), (1104, 736), (640, 640), (300, 200), (17, 999)])
def test_letterbox_roundtrip_boxes_within_one_pixel(h, w):
    rng = np.random.default_rng(h * w)
    x1 = rng.uniform(0, w - 2, 50)
    y1 = rng.uniform(0, h - 2, 50)
    boxes = np.stack([x1, y1, rng.uniform(x1 + 1, w), rng.uniform(y1 + 1, h)], 1).astype(np.float32)
    g = letterbox_geometry(h, w, 640, 640)
    back = unletterbox_boxes(letterbox_boxes(boxes, g), g, h, w)
    assert np.abs(back - boxes).max() < 1.0


def test_unletterbox_many_is_unletterbox_per_image():
    """The detector's one pass over all images' boxes gives exactly (bit for bit) what the
    one-image function gives, clipping included, for images with and without boxes."""
    rng = np.random.default_rng(7)
    sizes = [(int(rng.integers(17, 1200)), int(rng.integers(17, 2000))) for _ in range(40)]
    geoms = [letterbox_geometry(h, w, 640, 480) for h, w in sizes]
    boxes = [(rng.random((int(rng.integers(0, 9)), 4)) * 760 - 60).astype(np.float32) for _ in sizes]
    many = unletterbox_many(boxes, geoms, sizes)
    assert len(many) == len(sizes) and any(len(b) == 0 for b in boxes)
    for b, g, (h, w), got in zip(boxes, geoms, sizes, many, strict=True):
        assert got.dtype == np.float32 and np.array_equal(got, unletterbox_boxes(b, g, h, w))
    empty = unletterbox_many([np.zeros((0, 4), np.float32)] * 2, geoms[:2], sizes[:2])
    assert [e.shape for e in empty] == [(0, 4), (0, 4)]


@pytest.mark.parametrize("h,w", [(144, 780), (480, 640), (736, 1104), (500, 333)])
def test_letterbox_content_maps_back(h, w):
    """A white rectangle drawn in the original is found in the letterboxed image at the box
    letterbox_boxes predicts, and maps back within 1 px (plus resampling blur)."""
    img = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = w // 4, h // 3, w // 2, (2 * h) // 3
    img[y1:y2, x1:x2] = 255
    out, g = letterbox(img, 640, 640)
    assert out.shape == (640, 640, 3)
    ys, xs = np.where(out[..., 0] > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    pred = letterbox_boxes(np.array([[x1, y1, x2, y2]], np.float32), g)
    assert np.abs(found - pred).max() <= 1.0 + 0.5
    back = unletterbox_boxes(found, g, h, w)
    assert np.abs(back - [[x1, y1, x2, y2]]).max() <= 1.0 + 0.5 / g.ratio


def test_letterbox_padding_and_ultralytics_geometry():
    img = np.zeros((144, 780, 3), np.uint8)
    out, g = letterbox(img, 640, 640)
    assert (g.new_w, g.new_h) == (640, 118)
    assert g.pad_left == 0 and g.pad_top == 261  # round(261 - 0.1)
    assert (out[: g.pad_top] == PAD_VALUE).all() and (out[g.pad_top + g.new_h :] == PAD_VALUE).all()
    assert (out[g.pad_top : g.pad_top + g.new_h] == 0).all()


def test_to_tensor_is_rgb_nchw_unit_range():
    a = np.zeros((4, 4, 3), np.uint8)
    a[..., 0] = 255  # blue in BGR
    t = to_tensor([a, a])
    assert t.shape == (2, 3, 4, 4) and t.dtype == np.float32
    assert t[0, 2].max() == 1.0 and t[0, 0].max() == 0.0  # blue is channel 2 in RGB


def test_decode_real_photos():
    for p in photo_paths():
        img = decode_image(p.read_bytes(), max_pixels=10**8, max_bytes=10**8)
        assert img.ndim == 3 and img.shape[2] == 3 and img.dtype == np.uint8


def _jpeg(h=64, w=64) -> bytes:
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


@pytest.mark.parametrize(
    "data,match",
    [
        (b"", "empty file"),
        (b"this is not an image at all", "cannot decode"),
        (_jpeg()[:600], "truncated JPEG"),
        (cv2.imencode(".png", np.zeros((32, 32, 3), np.uint8))[1].tobytes()[:40], "truncated PNG"),
    ],
)
def test_decode_errors(data, match):
    with pytest.raises(ImageError, match=match):
        decode_image(data, max_pixels=10**8, max_bytes=10**8)


def test_truncation_check_finds_the_main_image_eoi_only():
    """The end-of-image marker is looked for after the first scan (searched from the end): data
    after it is allowed; an EXIF thumbnail's own EOI before the scan does not count; any cut
    inside the scan data is truncation."""
    from PIL import Image

    from raydetect.stages.preprocess import _jpeg_has_eoi

    full = _jpeg(120, 160)
    assert _jpeg_has_eoi(full) and _jpeg_has_eoi(full + b"\x00" * 100 + b"trailer")
    thumb = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(thumb, "JPEG")
    exif = Image.Exif()
    exif[0x010E] = "has a thumbnail"
    with_thumb = io.BytesIO()
    Image.open(io.BytesIO(full)).save(with_thumb, "JPEG", exif=exif.tobytes() + thumb.getvalue())
    data = with_thumb.getvalue()
    sos = data.rindex(b"\xff\xda")  # the main image's (one scan: baseline); the thumbnail has its own
    assert data.index(b"\xff\xd9") < sos  # the thumbnail's EOI comes before the scan
    assert _jpeg_has_eoi(data)
    for cut in range(sos + 4, len(data) - 1, 97):
        assert not _jpeg_has_eoi(data[:cut]), cut
        with pytest.raises(ImageError, match="truncated JPEG"):
            decode_image(data[:cut], max_pixels=10**8, max_bytes=10**8)


def test_decode_limits():
    big = _jpeg(400, 500)
    with pytest.raises(ImageError, match=r"image too large: 500x400 = 200000 pixels > max_pixels 100000"):
        decode_image(big, max_pixels=100_000, max_bytes=10**8)
    with pytest.raises(ImageError, match="file too large"):
        decode_image(big, max_pixels=10**8, max_bytes=100)


# Ultralytics >= 8.4 ``scale_boxes``: pad = round((640 - round(w0 * r)) / 2 - 0.1) per axis and one
# gain per axis from the rounded resize, x0 = (x - pad_x) * w0 / round(w0 * r). The expected
# numbers below are worked out by hand from that formula.
@pytest.mark.parametrize(
    "h,w,box,expected",
    [
        # 1920x1080: r = 1/3, resize 640x360, pad top 140; both axes exact
        (1080, 1920, [100, 200, 300, 400], [300, 180, 900, 780]),
        # 1279x719: r = 640/1279, resize 640x360 (719 r = 359.78 rounds up), pad top 140;
        # y gain 360/719: y 320 -> 180 * 719/360 = 359.5, y 500 -> 719 (the single ratio gives 359.72, 719.44)
        (719, 1279, [320, 320, 640, 500], [639.5, 359.5, 1279, 719]),
        # 333x1001 portrait: r = 640/1001, resize 213x640 (333 r = 212.91), pad left round(213.5 - 0.1) = 213;
        # x gain 213/333: x 319.5 -> 106.5 * 333/213 = 166.5, x 426 -> 333
        (1001, 333, [319.5, 0, 426, 640], [166.5, 0, 333, 1001]),
    ],
)
def test_unletterbox_per_axis_gain_matches_ultralytics(h, w, box, expected):
    g = letterbox_geometry(h, w, 640, 640)
    back = unletterbox_boxes(np.array([box], np.float32), g, h, w)
    np.testing.assert_allclose(back[0], expected, atol=2e-3)
    again = letterbox_boxes(np.array([expected], np.float32), g)
    np.testing.assert_allclose(again[0], box, atol=2e-3)
