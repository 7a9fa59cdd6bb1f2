"""Reading image files: the pixel limit checked from the header, OpenCV errors as BadFile, paths that are not
regular files, images and sizes in the stored frame (EXIF orientation ignored, as annotations are)."""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from mlkd.data import CustomDataset
from mlkd.data.base import read_image
from mlkd.data.images import (DEFAULT_MAX_IMAGE_PIXELS, ENV_MAX_IMAGE_PIXELS, header_size, image_size,
                              max_image_pixels, set_max_image_pixels)
from mlkd.errors import BadFile, BadInput, NotFound


@pytest.fixture(autouse=True)
def default_limit(monkeypatch):
    monkeypatch.delenv(ENV_MAX_IMAGE_PIXELS, raising=False)
    set_max_image_pixels(None)
    yield
    set_max_image_pixels(None)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says width x height but which holds no pixel data: what a decoder sees first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grey
    chunks = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)
    return path


def test_a_large_png_is_refused_from_its_header_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("1", (12000, 12000)).save(path)  # 144 Mpx of zeros: a few hundred KB on disk
    assert path.stat().st_size < 1_000_000
    decoded = []
    monkeypatch.setattr(cv2, "imdecode", lambda *a: decoded.append(a) or None)
    with pytest.raises(BadInput) as e:
        read_image(path)
    text = str(e.value)
    assert str(path) in text and "12000 x 12000 = 144,000,000 pixels" in text
    assert f"limit of {DEFAULT_MAX_IMAGE_PIXELS:,} pixels" in text
    assert ENV_MAX_IMAGE_PIXELS in text and "set_max_image_pixels" in text
    assert not decoded  # nothing was decoded


def test_the_limit_comes_from_the_function_then_the_environment_then_the_default(tmp_path, monkeypatch):
    path = tmp_path / "a.png"
    assert cv2.imwrite(str(path), np.zeros((20, 30, 3), np.uint8))
    assert max_image_pixels() == DEFAULT_MAX_IMAGE_PIXELS == 1 << 26 and read_image(path).shape == (20, 30, 3)
    monkeypatch.setenv(ENV_MAX_IMAGE_PIXELS, "599")
    with pytest.raises(BadInput, match=r"a\.png is 30 x 20 = 600 pixels, over mlkd's limit of 599 pixels"):
        read_image(path)
    set_max_image_pixels(600)  # the function wins over the environment
    assert read_image(path).shape == (20, 30, 3)
    set_max_image_pixels(None)
    monkeypatch.setenv(ENV_MAX_IMAGE_PIXELS, "lots")
    with pytest.raises(BadInput, match=rf"{ENV_MAX_IMAGE_PIXELS}='lots' must be a positive integer"):
        read_image(path)
    with pytest.raises(BadInput, match="positive integer or None"):
        set_max_image_pixels(0)


def test_a_header_over_opencvs_own_limit_is_a_bad_file_naming_it(tmp_path, monkeypatch):
    path = png_header_only(tmp_path / "huge.png", 40000, 40000)  # 1.6 Gpx: over OpenCV's 2**30
    with pytest.raises(BadInput, match=r"huge\.png is over mlkd's limit of 67,108,864 pixels \(Pillow, reading its "
                                       r"header: Image size \(1600000000 pixels\)"):
        read_image(path)
    set_max_image_pixels(1 << 40)  # allowed by mlkd: OpenCV's own limit answers, as a BadFile (not a cv2.error)
    with pytest.raises(BadFile, match=r"cannot decode image .*huge\.png \(\d+ bytes\): OpenCV failed: .*"
                                      r"CV_IO_MAX_IMAGE_PIXELS"):
        read_image(path)


def test_directories_and_fifos_say_what_they_are_and_never_block(tmp_path):
    (tmp_path / "x.png").mkdir()
    with pytest.raises(NotFound, match=r"x\.png is a directory"):
        read_image(tmp_path / "x.png")
    os.mkfifo(tmp_path / "f.png")
    raised: list[Exception] = []

    def read() -> None:
        try:
            read_image(tmp_path / "f.png")
        except Exception as e:  # noqa: BLE001 - the test inspects it
            raised.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "read_image blocked on a FIFO"
    assert isinstance(raised[0], NotFound) and "f.png is not a regular file" in str(raised[0])
    with pytest.raises(NotFound, match=r"image file not found: .*gone\.png"):
        read_image(tmp_path / "gone.png")


def test_a_dataset_listing_a_directory_says_so(tmp_path):
    (tmp_path / "x.png").mkdir()
    (tmp_path / "t.jsonl").write_text(json.dumps({"path": "x.png", "labels": ["a"]}) + "\n")
    with pytest.raises(NotFound, match=r"(?s)1 of 1 image files .*x\.png \(is a directory\)"):
        CustomDataset(tmp_path / "t.jsonl")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_images_and_sizes_are_in_the_stored_frame_whatever_the_exif_orientation(tmp_path, fmt):
    """COCO / VOC boxes are in the stored frame: an EXIF "rotate 90 degrees" must not turn the pixels under them
    (OpenCV applies it unless told not to)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees"
    path = tmp_path / f"r.{fmt.lower()}"
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :10] = 255  # a white left band: after a turn it would be a band at the top
    Image.fromarray(stored).save(path, fmt, exif=exif, quality=100)
    image = read_image(path)
    assert image.shape[:2] == (20, 40) == header_size(path) == image_size(path)
    assert image[:, :8].min() > 200 and image[:, 12:].max() < 60
    plain = tmp_path / "p.png"
    Image.new("RGB", (40, 20)).save(plain)
    assert image_size(plain) == (20, 40)


def test_files_pillow_cannot_read_fall_back_to_opencv(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"\x00" * 50)
    assert header_size(tmp_path / "junk.png") is None
    with pytest.raises(BadFile, match=r"cannot decode image .*junk\.png \(50 bytes\)"):
        image_size(tmp_path / "junk.png")


def test_the_decoded_image_cache_decodes_a_file_once_and_notices_a_changed_one(tmp_path, monkeypatch):
    from mlkd.data import images

    path = tmp_path / "a.png"
    first = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(first, cv2.COLOR_RGB2BGR))
    decoded = []
    real = images._decode
    monkeypatch.setattr(images, "_decode", lambda p: decoded.append(p) or real(p))
    with images.image_cache(1):
        a, b = images.read_image(path), images.read_image(path)
        assert len(decoded) == 1 and np.array_equal(a, first) and np.array_equal(b, first)
        a[:] = 0  # a caller changing its array does not change what the next one gets
        assert np.array_equal(images.read_image(path), first)
        second = first[::-1].copy()
        cv2.imwrite(str(path), cv2.cvtColor(second, cv2.COLOR_RGB2BGR))
        os.utime(path, ns=(1, 1))  # another mtime (and the same size): decoded again
        assert np.array_equal(images.read_image(path), second) and len(decoded) == 2
    images.read_image(path)  # outside the block: no cache
    assert len(decoded) == 3


def test_the_decoded_image_cache_keeps_within_its_budget():
    from mlkd.data.images import _Decoded

    cache = _Decoded(budget=2500)
    for i in range(4):
        cache.put(("x", i, 0), np.zeros(1000, np.uint8))
    assert [k[1] for k in cache.images] == [2, 3] and cache.used == 2000  # the least recently used went first
    assert cache.put(("big", 0, 0), np.zeros(3000, np.uint8)) is not None and ("big", 0, 0) not in cache.images
