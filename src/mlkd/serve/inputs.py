"""What a request carries, checked before any work: its images (multipart files or one raw image body) and its
options, each refusal an :class:`HTTPError` whose status and message say what was wrong and what is expected.

    400  a body that is not an image (or is truncated), a malformed multipart body, no image at all
    413  a body over ``--max-upload-mb`` (see :mod:`mlkd.serve.limits`), an image over mlkd's pixel limit, more
         images in one request than the queue holds
    415  a content type other than multipart/form-data, image/* or application/octet-stream
    422  a bad ``top_k`` or ``threshold`` (or an unknown option), naming the field
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import numpy as np

from mlkd.data.images import decode_image
from mlkd.errors import BadFile, BadInput

IMAGE_TYPES = ("multipart/form-data", "image/*", "application/octet-stream")
OPTIONS = {"predict": ("top_k", "threshold"), "detect": ("score_threshold", "max_detections")}


class HTTPError(Exception):
    """A refused request: ``status``, a message, the field at fault (422) and extra headers (Retry-After)."""

    def __init__(self, status: int, detail: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.field, self.headers = status, detail, field, dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"detail": self.detail, **({"field": self.field} if self.field else {})}


async def read_request(request: Any, endpoint: str, max_images: int) -> tuple[list[tuple[str, bytes]], dict]:
    """``([(name, bytes)], {option: text})`` of a Starlette request to ``endpoint`` (``predict`` or ``detect``):
    multipart files (any field name; other fields are options) or the raw body as one image; options from the
    query string too."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    options = dict(request.query_params)
    if kind == "multipart/form-data":
        images = await _multipart(request, options, max_images)
    elif kind.startswith("image/") or kind == "application/octet-stream":
        body = await request.body()
        images = [("the request body", body)] if body else []
    else:
        raise HTTPError(415, f"content type {kind or '(none)'!r} is not accepted; send the image as multipart/"
                             "form-data files or as the raw body with an image/* or application/octet-stream type")
    unknown = sorted(set(options) - set(OPTIONS[endpoint]))
    if unknown:
        raise HTTPError(422, f"unknown option(s) {unknown}; /v1/{endpoint} takes {list(OPTIONS[endpoint])}",
                        field=unknown[0])
    if not images:
        raise HTTPError(400, "the request has no image: send one or more image files")
    if len(images) > max_images:
        raise HTTPError(413, f"{len(images)} images in one request; at most {max_images} (the queue's size)")
    return images, options


async def _multipart(request: Any, options: dict, max_images: int) -> list[tuple[str, bytes]]:
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException

    try:
        form = await request.form(max_files=max_images + 1, max_fields=16)
    except (MultiPartException, HTTPException) as e:  # Starlette turns the first into the second inside an app
        reason = getattr(e, "message", None) or getattr(e, "detail", "")
        if "Too many files" in reason:
            raise HTTPError(413, f"more than {max_images} images in one request; at most {max_images} (the queue's "
                                 "size)") from None
        raise HTTPError(400, f"malformed multipart body: {reason}") from None
    images = []
    try:
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                images.append((value.filename or field, await value.read()))
            elif field in options:
                raise HTTPError(422, f"option {field!r} given twice (query string and form)", field=field)
            else:
                options[field] = value
    finally:
        await form.close()
    return images


def decode(name: str, data: bytes) -> np.ndarray:
    """The RGB array of one uploaded image, decoded as ``mlkd.load(...).predict`` decodes a file."""
    try:
        return decode_image(data, name)
    except BadInput as e:  # over the pixel limit: refused from the header, before decoding
        raise HTTPError(413, str(e)) from None
    except BadFile as e:
        raise HTTPError(400, f"{e}; expected a JPEG, PNG, BMP, TIFF or WebP file") from None


def number(options: dict, field: str) -> Any:
    """Option ``field`` parsed: absent -> None; a number; a JSON list or object; else a 422 naming it."""
    text = options.get(field)
    if text is None:
        return None
    text = text.strip()
    try:
        value = json.loads(text) if text[:1] in "[{" else float(text)
    except ValueError:
        value = None
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        raise HTTPError(422, f"{field}={text!r} is not a number" + (
            ", a JSON list of one number per class or a JSON object class -> number" if field == "threshold" else ""),
            field=field)
    return value


def integer(options: dict, field: str) -> int | None:
    """Option ``field`` as a whole number (None when absent); a 422 naming it otherwise."""
    value = number(options, field)
    if value is not None and (not isinstance(value, float) or not value.is_integer()):
        raise HTTPError(422, f"{field}={options[field]!r} is not a whole number", field=field)
    return None if value is None else int(value)
