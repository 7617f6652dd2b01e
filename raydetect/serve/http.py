"""HTTP side of the online endpoint: body limits, content types, API keys, image checks and
the JSON wire format. Plain functions over Starlette requests, so the Serve deployment in
:mod:`raydetect.serve.app` stays small and every bad input maps to one clear 4xx status:

* 400 undecodable, empty or truncated image, malformed multipart body;
* 401 missing or wrong API key (when one is configured);
* 413 body larger than ``max_bytes``, image larger than ``max_pixels``, too many files;
* 415 content type other than the image types below or ``multipart/form-data``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
import typing
from collections.abc import AsyncIterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException
from pydantic import BaseModel, Field, create_model
from starlette.requests import Request
from starlette.responses import Response

from raydetect.config import ConfigError
from raydetect.stages.preprocess import (
    ImageError,
    ImageTooLargeError,
    check_encoded,
    check_pixels,
    decode_image,
    image_size,
)
from raydetect.types import Detection, ModelIdentity

IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/tiff")
MULTIPART = "multipart/form-data"
#: Types a part of a multipart upload may also carry (clients often send these for files);
#: such parts are accepted and decoding tells whether they are images.
GENERIC_PART_TYPES = ("application/octet-stream", "")
#: Room for multipart boundaries and part headers on top of the image bytes.
MULTIPART_OVERHEAD = 64 * 1024


@dataclass
class Upload:
    """One image as it arrived: the field it came in, a name for the result and its bytes."""

    field: str
    name: str
    content_type: str
    data: bytes


def media_type(content_type: str | None) -> str:
    """``'image/jpeg; q=1'`` → ``'image/jpeg'``; missing → ``''``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_image_type(content_type: str, *, part: bool = False) -> None:
    """415 unless ``content_type`` is a supported image type (or, for a multipart part,
    a generic binary type)."""
    if content_type in IMAGE_TYPES or (part and content_type in GENERIC_PART_TYPES):
        return
    what = f"part content type {content_type!r}" if part else f"content type {content_type or 'none'!r}"
    raise HTTPException(
        415, f"unsupported {what}: send one of {', '.join(IMAGE_TYPES)} or a multipart upload"
    )


async def read_body(request: Request, limit: int, deadline_s: float | None = None) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes: from Content-Length before
    reading anything when the client sends it, else while streaming. A body not complete
    within ``deadline_s`` gets 408 (a slow client must not hold the replica's request slot)."""
    if deadline_s is None:
        return await _read_body(request, limit)
    try:
        async with asyncio.timeout(deadline_s):
            return await _read_body(request, limit)
    except TimeoutError:
        raise HTTPException(
            408, f"request body not received within read_timeout_s {deadline_s:g} s", {"Connection": "close"}
        ) from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise HTTPException(400, f"invalid Content-Length {declared!r}") from None
        if n > limit:
            raise HTTPException(413, f"request body of {n} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_multipart(request: Request, body: bytes, max_files: int, max_bytes: int) -> list[Upload]:
    """File parts of a multipart body already read by :func:`read_body` (400 if malformed,
    413 for too many files or a part over ``max_bytes``)."""
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=max_files + 1).parse()
    except MultiPartException as e:
        if "Too many files" in e.message:
            raise HTTPException(413, f"too many files: at most {max_files} per request") from None
        raise HTTPException(400, f"malformed multipart body: {e.message}") from None
    except AssertionError as e:  # python-multipart missing: a server fault, not a client one
        raise RuntimeError(str(e)) from None
    except Exception as e:  # the parser's own errors on garbage input
        raise HTTPException(400, f"malformed multipart body: {type(e).__name__}: {e}") from None
    uploads = []
    try:
        for field, value in form.multi_items():
            if not isinstance(value, UploadFile):
                continue
            data = await value.read()
            if len(data) > max_bytes:
                raise HTTPException(413, f"file {value.filename!r} of {len(data)} bytes exceeds "
                                         f"max_bytes {max_bytes}")
            name = value.filename or field
            uploads.append(Upload(field, name, media_type(value.content_type), data))
    finally:
        await form.close()
    if len(uploads) > max_files:
        raise HTTPException(413, f"too many files: at most {max_files} per request (got {len(uploads)})")
    return uploads


class PixelBudget:
    """Admission by decoded size: at most ``capacity`` pixels decoded at once in this replica
    (a 40 MP image is 120 MB of BGR before letterboxing). A request waits, first come first
    served, for room; after ``wait_s`` it gets 503 with ``Retry-After``."""

    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity = capacity
        self.wait_s = wait_s
        self.in_use = 0
        self._waiters: list[tuple[int, asyncio.Future]] = []

    def _wake(self) -> None:
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            n, fut = self._waiters.pop(0)
            if not fut.done():
                self.in_use += n
                fut.set_result(None)

    async def acquire(self, pixels: int) -> int:
        """Take ``pixels`` (capped at ``capacity``); returns what to :meth:`release`."""
        n = min(max(pixels, 1), self.capacity)
        if not self._waiters and self.in_use + n <= self.capacity:
            self.in_use += n
            return n
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
        except TimeoutError:
            if fut.done():  # admitted just as the wait ran out
                return n
            self._waiters.remove((n, fut))
            fut.cancel()
            self._wake()
            retry = max(1, round(self.wait_s))
            raise HTTPException(
                503, f"replica busy decoding {self.in_use} pixels (max_pixels_in_flight "
                     f"{self.capacity}); retry in {retry} s", {"Retry-After": str(retry)},
            ) from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release(n)
            else:
                self._waiters.remove((n, fut))
                fut.cancel()
            raise
        return n

    def release(self, n: int) -> None:
        self.in_use -= n
        self._wake()


def pixels_of(data: bytes, max_pixels: int) -> int:
    """Pixels the image will decode to, from its header; ``max_pixels`` when the header does
    not tell (the decoder refuses more)."""
    try:
        size = image_size(data)
    except Exception:
        size = None
    return max_pixels if size is None else min(size[0] * size[1], max_pixels)


def release_memory() -> None:
    """Hand freed heap back to the OS (glibc ``malloc_trim``): decoding big images in worker
    threads leaves arenas that otherwise keep the replica's RSS at its peak."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# --- API keys ---------------------------------------------------------------------------


def read_api_key(env_var: str | None) -> bytes | None:
    """The key from ``env_var`` (None: no key configured). A named but unset or empty
    variable is an error: the endpoint must not silently run open."""
    if env_var is None:
        return None
    value = os.environ.get(env_var, "")
    if not value:
        raise ConfigError(f"serve.api_key_env: environment variable {env_var} is not set or empty")
    return value.encode()


def check_api_key(headers: Mapping[str, str], expected: bytes | None) -> None:
    """401 unless the request carries ``expected`` as ``Authorization: Bearer <key>`` or
    ``X-API-Key: <key>`` (compared in constant time)."""
    if expected is None:
        return
    given: str | None = None
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer":
            given = token.strip()
    if given is None:
        given = headers.get("x-api-key")
    challenge = {"WWW-Authenticate": "Bearer"}
    if not given:
        raise HTTPException(
            401, "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", challenge
        )
    if not hmac.compare_digest(given.encode(), expected):
        raise HTTPException(401, "invalid API key", challenge)


# --- images -----------------------------------------------------------------------------


def decode_upload(data: bytes, max_pixels: int, max_bytes: int) -> np.ndarray:
    """Decode with the same function the batch job uses (:func:`decode_image`); its errors
    become 413 (too large) or 400 (anything else about the bytes)."""
    with image_errors_as_http():
        return decode_image(data, max_pixels, max_bytes)


def check_upload(data: bytes, max_pixels: int, max_bytes: int) -> None:
    """The checks :func:`decode_image` makes before decoding (size, truncation, pixels from
    the header), for engines that decode a whole batch on the GPU."""
    with image_errors_as_http():
        check_encoded(data, max_bytes)
        size = image_size(data)
        if size is not None:
            check_pixels(size[0], size[1], max_pixels)


@contextmanager
def image_errors_as_http():
    try:
        yield
    except ImageTooLargeError as e:
        raise HTTPException(413, str(e)) from None
    except ImageError as e:
        raise HTTPException(400, str(e)) from None
    except Exception as e:  # a decoder failing on hostile bytes is still the input's fault
        raise HTTPException(400, f"cannot decode: {type(e).__name__}: {e}") from None


# --- wire format (documents the JSON in the OpenAPI schema) -----------------------------


def model_of(dc: type, name: str, doc: str) -> type[BaseModel]:
    """The pydantic model of the dataclass ``dc`` (same field names and types): the wire format
    of a result type is derived from the type itself, never written twice."""
    hints = typing.get_type_hints(dc)
    return create_model(name, __doc__=doc, **{f.name: (hints[f.name], ...) for f in dataclasses.fields(dc)})


DetectionOut = model_of(Detection, "DetectionOut", "One box, pixel xyxy in the original image")
ModelId = model_of(ModelIdentity, "ModelId", "The model and engine that answered")


class TimingsOut(BaseModel):
    queue_ms: float = Field(description="Waiting for a batch to start")
    decode_ms: float = Field(description="Decoding this request's image (GPU engines: header checks; decoding is in preprocess_ms)")
    preprocess_ms: float = Field(description="Letterbox of the whole batch")
    inference_ms: float = Field(description="Engine call shared by the whole batch")
    postprocess_ms: float = Field(description="Box decoding + NMS of the whole batch")
    batch_size: int = Field(description="Online images in the engine call this request joined")
    archive_images: int = Field(0, description="Archive images (jobs run --via-serve) that filled the rest of that engine call")
    total_ms: float = Field(description="In the replica, from request to response")


class DetectResponse(BaseModel):
    uri: str
    width: int | None
    height: int | None
    detections: list[DetectionOut]
    error: str | None
    model: ModelId
    timings: TimingsOut


class BatchItem(BaseModel):
    status: int = Field(description="200, or the 4xx this image alone would have got")
    uri: str
    width: int | None = None
    height: int | None = None
    detections: list[DetectionOut] = []
    error: str | None = None
    timings: TimingsOut | None = None


class BatchResponse(BaseModel):
    model: ModelId
    results: list[BatchItem]


class ModelInfo(BaseModel):
    sha256: str
    url: str
    names: dict[int, str]
    imgsz: list[int]
    layout: str
    engine: str
    precision: str
    device: str
    max_batch_size: int = Field(description="Requests merged into one engine call")
    batch_wait_timeout_s: float
    engine_batch_size: int = Field(description="Images per engine call (the detector's chunk)")


def enforce(model: type[BaseModel], payload: dict) -> Response:
    """``payload`` validated by its response model and serialized by it (FastAPI does not
    validate a ``Response`` a handler returns itself): what the OpenAPI schema documents is what
    is sent, or the request fails with 500."""
    return Response(model.model_validate(payload).model_dump_json(), media_type="application/json")


def image_body_openapi(*, many: bool) -> dict:
    """``openapi_extra`` describing the request body (the handlers read the body themselves
    to enforce the limits): one raw image or a multipart field ``file``; with ``many``, a
    multipart upload of several files."""
    binary = {"type": "string", "format": "binary"}
    if many:
        multipart = {"type": "object", "properties": {"files": {"type": "array", "items": binary}}}
        return {"requestBody": {"required": True, "content": {MULTIPART: {"schema": multipart}}}}
    content: dict = {t: {"schema": binary} for t in IMAGE_TYPES}
    content[MULTIPART] = {"schema": {"type": "object", "properties": {"file": binary}, "required": ["file"]}}
    return {"requestBody": {"required": True, "content": content}}
