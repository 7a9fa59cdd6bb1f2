"""The teacher's region features for stage 1 (L_f), computed once per (image, flip) and read from an LMDB.

Why this is exact up to float16: the frozen teacher is deterministic (eval mode) and its input for an image is
the image (flipped or not) warped to its scale with the cached proposals; nothing of the student's augmentation
reaches it. So the features it gives each proposal can be computed before training and read back per batch
instead of running the teacher's backbone at every step. With ``distill.top_k`` only the kept proposals (and
their positions) are stored.

On disk, ``RUN/teacher_features/`` holds ``data.mdb`` (key ``"<image id>\\t<0|1>"`` -> a 4-byte count R, R int32
positions among the image's proposals, then each layer's ``(R, D)`` float16 features) and ``meta.json`` (the
fingerprint of what they were computed from; a different fingerprint rebuilds the store).
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Iterable

import lmdb
import numpy as np
import torch
from tqdm import tqdm

from mlkd import lmdb_env
from mlkd.errors import MissingEntry

logger = logging.getLogger(__name__)

_COUNT = struct.Struct("<I")


def estimate_bytes(num_images: int, regions: int, widths: dict[str, int]) -> int:
    """Disk space of the features of ``num_images`` images x 2 flips x ``regions`` regions."""
    return 2 * num_images * regions * (4 + 2 * sum(widths.values()))


class TeacherFeatures:
    """Read-only access: :meth:`lookup` gives a batch's features and positions."""

    def __init__(self, path: Path, widths: dict[str, int]) -> None:
        self.path, self.widths = path, widths
        lmdb_env.acquire(path, writable=False)
        self._open = True

    def close(self) -> None:
        if self._open:
            lmdb_env.release(self.path)
            self._open = False

    def get(self, image_id: str, flipped: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Positions ``(R,)`` int64 and per layer ``(R, D)`` float16 of one view."""
        with lmdb_env.env(self.path).begin(buffers=False) as txn:
            data = txn.get(f"{image_id}\t{int(flipped)}".encode())
        if data is None:
            raise MissingEntry(f"no teacher features for image {image_id!r} (flip {flipped}) in {self.path}")
        (r,) = _COUNT.unpack_from(data)
        keep = np.frombuffer(data, "<i4", r, _COUNT.size).astype(np.int64)
        offset, feats = _COUNT.size + 4 * r, {}
        for layer, width in self.widths.items():
            feats[layer] = np.frombuffer(data, "<f2", r * width, offset).reshape(r, width)
            offset += 2 * r * width
        return keep, feats

    def lookup(self, targets: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """A batch: per layer ``(N', D)`` float32 features and ``(N',)`` row positions among the batch's
        flattened proposals (the order :func:`mlkd.models.ops.flatten_proposals` gives)."""
        rows, feats = [], {layer: [] for layer in self.widths}
        offset = 0
        for t in targets:
            keep, f = self.get(t["image_id"], bool(t["flipped"]))
            rows.append(torch.from_numpy(keep) + offset)
            for layer, value in f.items():
                feats[layer].append(torch.from_numpy(value.astype(np.float32)))
            offset += len(t["proposals"])
        return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(rows)


def build_teacher_features(path: Path, fingerprint: dict[str, Any], widths: dict[str, int],
                           views: Iterable[tuple[str, bool, Callable[[], tuple[np.ndarray, dict]]]],
                           total: int, progress: bool = True) -> TeacherFeatures:
    """Open the store at ``path`` when its fingerprint matches, else (re)build it from ``views``: ``(image id,
    flipped, compute)`` where ``compute()`` returns positions and per-layer features of that view."""
    meta = path / "meta.json"
    if meta.is_file() and json.loads(meta.read_text()) == fingerprint:
        return TeacherFeatures(path, widths)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    lmdb_env.acquire(path, writable=True)
    try:
        pending: list[tuple[bytes, bytes]] = []
        for image_id, flipped, compute in tqdm(views, total=total, desc="teacher features", unit="view",
                                               disable=not progress):
            keep, feats = compute()
            parts = [_COUNT.pack(len(keep)), np.asarray(keep, "<i4").tobytes()]
            parts += [np.asarray(feats[layer], "<f2").tobytes() for layer in widths]
            pending.append((f"{image_id}\t{int(flipped)}".encode(), b"".join(parts)))
            if len(pending) >= 64:
                _put(path, pending)
        _put(path, pending)
    finally:
        lmdb_env.release(path)
    meta.write_text(json.dumps(fingerprint, indent=1) + "\n")  # last: an interrupted build is rebuilt
    return TeacherFeatures(path, widths)


def _put(path: Path, pending: list[tuple[bytes, bytes]]) -> None:
    env = lmdb_env.env(path)
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in pending:
                    txn.put(key, value)
            break
        except lmdb.MapFullError:  # grow the map and write the batch again
            env.set_mapsize(env.info()["map_size"] * 2)
    pending.clear()
