"""Reading image files: what kind of path it is, its size from the header, a pixel limit, and the decode.

Every image mlkd decodes goes through :func:`read_image`. Before decoding, the header's size (read with Pillow,
which reads only the header) is checked against a pixel limit, because a small compressed file can describe a
huge image: a 12000 x 12000 PNG of 420 KB decodes to 430 MB, plus OpenCV's and PyTorch's copies. The limit is
:data:`DEFAULT_MAX_IMAGE_PIXELS`, or the environment variable ``MLKD_MAX_IMAGE_PIXELS``, or what
:func:`set_max_image_pixels` set (in that order of precedence, the function first).

Images are decoded in the frame they are stored in: a file's EXIF orientation is ignored, because annotations
(COCO, VOC, most tools) give boxes in the stored frame; applying it would turn the pixels under their boxes.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import stat
import warnings
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from mlkd.errors import BadFile, BadInput, NotFound

DEFAULT_MAX_IMAGE_PIXELS = 1 << 26  # 67,108,864 (64 Mi pixels, e.g. 8192 x 8192): a 64 MP photo still passes
ENV_MAX_IMAGE_PIXELS = "MLKD_MAX_IMAGE_PIXELS"
_max_pixels: int | None = None  # set by set_max_image_pixels; None = environment or default
_RAISE = (f"shrink the image, or raise the limit with the environment variable {ENV_MAX_IMAGE_PIXELS}=N or "
          "mlkd.data.images.set_max_image_pixels(N)")


def set_max_image_pixels(limit: int | None) -> None:
    """Set the pixel limit of :func:`read_image` for this process (``None``: back to the environment / default)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise BadInput(f"the image pixel limit must be a positive integer or None, got {limit!r}")
    global _max_pixels
    _max_pixels = limit


def max_image_pixels() -> int:
    """The pixel limit in force: :func:`set_max_image_pixels`, else ``$MLKD_MAX_IMAGE_PIXELS``, else the default."""
    if _max_pixels is not None:
        return _max_pixels
    text = os.environ.get(ENV_MAX_IMAGE_PIXELS, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise BadInput(f"environment variable {ENV_MAX_IMAGE_PIXELS}={text!r} must be a positive integer "
                       f"(a number of pixels, e.g. {DEFAULT_MAX_IMAGE_PIXELS})")
    return value


def file_problem(path: str | Path) -> str | None:
    """None when ``path`` is a regular file (symlinks followed); else what it is: ``"does not exist"``,
    ``"is a directory"`` or ``"is not a regular file (a FIFO, socket or device)"``. Never opens the path, so a
    FIFO cannot block it."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:  # a broken symlink loop, a path component that is a file, no permission
        return f"cannot be accessed ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    return "is a directory" if stat.S_ISDIR(mode) else "is not a regular file (a FIFO, socket or device)"


def check_image_file(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it is a regular file, else ``NotFound`` saying what it is."""
    problem = file_problem(path)
    if problem is not None:
        raise NotFound(f"image file {path} {problem}" if problem != "does not exist"
                       else f"image file not found: {path}")
    return Path(path)


def header_size(path: str | Path) -> tuple[int, int] | None:
    """``(H, W)`` of an image file from its header (the stored frame, as :func:`read_image` decodes it); None when
    Pillow cannot read the header (a format only OpenCV knows, or a damaged file)."""
    path = check_image_file(path)
    return _header_size(path, path)


def _header_size(source: Path | io.BytesIO, name: str | Path) -> tuple[int, int] | None:
    with warnings.catch_warnings():  # Pillow's own bomb warning; mlkd applies its own limit
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(source) as im:
                w, h = im.size
        except Image.DecompressionBombError as e:  # over twice Pillow's own limit (its message has the size)
            if max_image_pixels() > 2 * (Image.MAX_IMAGE_PIXELS or 0):
                return None  # mlkd's limit allows it: OpenCV decodes it, and the decoded size is checked
            raise BadInput(f"image {name} is over mlkd's limit of {max_image_pixels():,} pixels (Pillow, reading "
                           f"its header: {e}); {_RAISE}") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            return None
    return h, w


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file as :func:`read_image` returns it, from the header when Pillow can read it,
    else by decoding the file (checked, so errors are those of :func:`read_image`)."""
    hw = header_size(path)
    return hw if hw is not None else read_image(path).shape[:2]


def _check_pixels(path: str | Path, hw: tuple[int, int]) -> None:
    limit = max_image_pixels()
    if hw[0] * hw[1] > limit:
        raise BadInput(f"image {path} is {hw[1]} x {hw[0]} = {hw[0] * hw[1]:,} pixels, over mlkd's limit of "
                       f"{limit:,} pixels ({hw[0] * hw[1] * 3 / 2**20:,.0f} MiB as decoded RGB, before any copy); "
                       f"{_RAISE}")


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an RGB uint8 array ``(H, W, 3)`` in its stored frame (EXIF orientation ignored).
    Inside :func:`image_cache`, a file decoded before (same path, size and mtime) is not decoded again.

    Errors: ``NotFound`` for a path that is missing, a directory or not a regular file; ``BadInput`` for an
    image over the pixel limit (checked from the header, before decoding); ``BadFile`` for a file that cannot
    be decoded (any OpenCV error included). Each names the file.
    """
    path = check_image_file(path)
    if _cache is None:
        return _decode(path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    image = _cache.get(key)
    if image is None:
        image = _cache.put(key, _decode(path))
    return image.copy()  # the caller may change it; the cache keeps the decoded file


class _Decoded:
    """Decoded images by (path, size, mtime), least recently used dropped beyond ``budget`` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used, self.images = budget, 0, collections.OrderedDict()

    def get(self, key: tuple) -> np.ndarray | None:
        image = self.images.get(key)
        if image is not None:
            self.images.move_to_end(key)
        return image

    def put(self, key: tuple, image: np.ndarray) -> np.ndarray:
        if image.nbytes <= self.budget:
            self.images[key] = image
            self.used += image.nbytes
            while self.used > self.budget:
                self.used -= self.images.popitem(last=False)[1].nbytes
        return image


_cache: _Decoded | None = None


@contextlib.contextmanager
def image_cache(megabytes: float) -> Iterator[None]:
    """Inside this block, :func:`read_image` keeps up to ``megabytes`` of decoded images in memory (0: none), so
    that a dataset read every epoch is decoded once (the demo's 600 PNGs of 160 px take 46 MB; decoding them was
    most of a small student's epoch). A block inside another keeps the outer cache. Each DataLoader worker process
    has its own."""
    global _cache
    outer = _cache
    if outer is None and megabytes > 0:
        _cache = _Decoded(int(megabytes * 2**20))
    try:
        yield
    finally:
        _cache = outer


def decode_image(data: bytes, name: str = "the uploaded image") -> np.ndarray:
    """Decode an image file's bytes exactly as :func:`read_image` decodes the file: RGB uint8 ``(H, W, 3)`` in
    the stored frame, the pixel limit checked from the header before decoding. ``name`` is how errors call it
    (``BadInput`` over the limit, ``BadFile`` when it cannot be decoded, a truncated file included)."""
    return _decode_bytes(np.frombuffer(data, dtype=np.uint8), _header_size(io.BytesIO(data), name), name)


def _decode(path: Path) -> np.ndarray:
    return _decode_bytes(np.fromfile(str(path), dtype=np.uint8), header_size(path), path)


def _decode_bytes(data: np.ndarray, hw: tuple[int, int] | None, name: str | Path) -> np.ndarray:
    if hw is not None:
        _check_pixels(name, hw)
    try:
        img = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    except cv2.error as e:  # e.g. a header over OpenCV's own limit (OPENCV_IO_MAX_IMAGE_PIXELS)
        reason = " ".join(str(e).split())
        raise BadFile(f"cannot decode image {name} ({data.size} bytes): OpenCV failed: {reason}") from None
    if img is None:
        raise BadFile(f"cannot decode image {name} ({data.size} bytes): not a readable image file")
    if hw is None:  # no header Pillow could read: check what was decoded, so the limit still holds afterwards
        _check_pixels(name, img.shape[:2])
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
