"""Open a video through fsspec (local path or s3://) with PyAV and read its stream facts.

The file object is read on demand (range requests on S3), never downloaded first: the
container headers are read at the start (and, for MP4 with the index at the end, at the end),
and decoding reads only the packets it needs after a seek.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from raydetect.config import StorageConfig
from raydetect.storage import filesystem, is_remote_fs

#: Read-ahead block for remote files: small enough that a seek does not fetch much unused data.
REMOTE_BLOCK_SIZE = 4 * 1024 * 1024


class VideoError(Exception):
    """The video cannot be opened or has no usable video stream; the message says why."""


@contextlib.contextmanager
def open_video(uri: str, storage: StorageConfig | None = None) -> Iterator[tuple[Any, Any]]:
    """``(container, video_stream)`` for ``uri``, read through an fsspec file object."""
    import av

    fs, path = filesystem(uri, storage)
    kwargs = {"block_size": REMOTE_BLOCK_SIZE, "cache_type": "readahead"} if is_remote_fs(fs) else {}
    try:
        f = fs.open(path, "rb", **kwargs)
    except FileNotFoundError:
        raise VideoError(f"not found: {uri}") from None
    except OSError as e:
        raise VideoError(f"cannot open: {type(e).__name__}: {e}") from None
    with f:
        try:
            container = av.open(f, mode="r")
        except av.FFmpegError as e:
            raise VideoError(f"cannot read the container (damaged or not a video): {_msg(e)}") from None
        try:
            if not container.streams.video:
                raise VideoError("no video stream")
            yield container, container.streams.video[0]
        finally:
            container.close()


def _msg(e: BaseException) -> str:
    """FFmpeg error text without the file name PyAV appends."""
    strerror = getattr(e, "strerror", None)
    return strerror or str(e)


@dataclass(frozen=True)
class VideoInfo:
    """What the headers say about the first video stream. PTS are in ``time_base`` ticks."""

    uri: str
    format: str
    codec: str
    width: int
    height: int
    time_base_num: int
    time_base_den: int
    fps_num: int
    fps_den: int
    origin: int  # PTS of the stream start (first frame), the zero of frame indices and sampling
    end_pts: int | None  # exclusive end from the headers (duration), None when unknown
    frames: int | None  # frame count from the headers (often absent or approximate)

    @property
    def time_base(self) -> Fraction:
        return Fraction(self.time_base_num, self.time_base_den)

    @property
    def fps(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)

    @property
    def duration_s(self) -> float | None:
        if self.end_pts is None:
            return None
        return float((self.end_pts - self.origin) * self.time_base)

    @property
    def frame_pts(self) -> Fraction:
        """Nominal frame duration in ticks."""
        return 1 / (self.fps * self.time_base)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rate(stream) -> Fraction:
    for r in (stream.guessed_rate, stream.average_rate, stream.base_rate):
        if r is not None and r > 0 and math.isfinite(float(r)):
            return Fraction(r.numerator, r.denominator)
    return Fraction(25)  # no rate at all in the headers: a conventional default, indices only


def stream_info(uri: str, container, stream) -> VideoInfo:
    import av

    tb = stream.time_base
    if tb is None or tb <= 0:
        raise VideoError("video stream has no time base")
    tb = Fraction(tb.numerator, tb.denominator)
    origin = stream.start_time if stream.start_time is not None else 0
    end_pts = None
    if stream.duration is not None and stream.duration > 0:
        end_pts = origin + int(stream.duration)
    elif container.duration is not None and container.duration > 0:
        # container duration is in AV_TIME_BASE (microseconds)
        end_pts = origin + math.floor(Fraction(container.duration, av.time_base) / tb)
    cc = stream.codec_context
    fps = _rate(stream)
    return VideoInfo(
        uri=uri,
        format=container.format.name,
        codec=cc.name,
        width=int(cc.width or 0),
        height=int(cc.height or 0),
        time_base_num=tb.numerator,
        time_base_den=tb.denominator,
        fps_num=fps.numerator,
        fps_den=fps.denominator,
        origin=int(origin),
        end_pts=end_pts,
        frames=int(stream.frames) if stream.frames else None,
    )


def probe_video(uri: str, storage: StorageConfig | None = None) -> VideoInfo:
    """Read the headers of ``uri``; raise :class:`VideoError` if it is not a usable video."""
    with open_video(uri, storage) as (container, stream):
        return stream_info(uri, container, stream)
