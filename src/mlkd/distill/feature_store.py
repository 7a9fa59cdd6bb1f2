"""The teacher's region features for stage 1 (L_f), computed once per (image, flip) and read from an LMDB.

Why this is exact up to float16: the frozen teacher is deterministic (eval mode) and its input for an image is
the image (flipped or not) warped to its scale with the cached proposals; nothing of the student's augmentation
reaches it. So the features it gives each proposal can be computed before training and read back per batch
instead of running the teacher's backbone at every step. With ``distill.top_k`` only the kept proposals (and
their positions) are stored.

On disk, ``RUN/teacher_features/`` holds one LMDB per process that built it, ``shard<r>/data.mdb`` (under
``torchrun`` each rank computes every ``world_size``-th image; alone there is one shard): key
``"<image id>\\t<0|1>"`` -> a 4-byte count R, R int32 positions among the image's proposals, then each layer's
``(R, D)`` float16 features. ``meta.json`` (written last: a store without it is incomplete and rebuilt) holds the
fingerprint of what they were computed from (a different one rebuilds the store) and the shard names. All ranks
read every shard, so under several nodes the run folder must be on a shared file system. A shard whose
``data.mdb`` is cut short (a full disk, an interrupted copy) makes the store not current, so it is rebuilt; one
found so while reading, or a record of the wrong length, is a ``BadFile`` naming it.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable

import lmdb
import numpy as np
import torch
from tqdm import tqdm

from mlkd.errors import BadFile, CannotWrite, MissingEntry
from mlkd.utils import lmdb_env
from mlkd.utils.checkpoint import write_atomically

logger = logging.getLogger(__name__)

_COUNT = struct.Struct("<I")
WHAT = "teacher feature store shard"


def _fix(store: Path) -> str:
    return (f"remove {store} (the run folder's teacher_features): the next run of the same command, with --resume, "
            "computes it again")


def estimate_bytes(num_images: int, regions: int, widths: dict[str, int]) -> int:
    """Disk space of the features of ``num_images`` images x 2 flips x ``regions`` regions."""
    return 2 * num_images * regions * (4 + 2 * sum(widths.values()))


class TeacherFeatures:
    """Read-only access to a finished store: :meth:`lookup` gives a batch's features and positions. Use it in a
    ``with`` block (or call :meth:`close`): it holds the store's LMDB environments open."""

    def __init__(self, path: Path, widths: dict[str, int]) -> None:
        self.path, self.widths = path, widths
        meta = read_meta(path)
        if meta is None:
            raise MissingEntry(f"{path} is not a finished teacher feature store (no readable meta.json)")
        self.shards: list[Path] = []
        self._open = True
        try:
            for shard in (path / name for name in meta["shards"]):
                lmdb_env.acquire(shard, writable=False, what=WHAT, fix=_fix(path))
                self.shards.append(shard)
        except BaseException:  # a damaged shard: release the ones already open
            self.close()
            raise

    def close(self) -> None:
        if self._open:
            for shard in self.shards:
                lmdb_env.release(shard)
            self._open = False

    def __enter__(self) -> "TeacherFeatures":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, image_id: str, flipped: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Positions ``(R,)`` int64 and per layer ``(R, D)`` float16 of one view."""
        key, data = f"{image_id}\t{int(flipped)}".encode(), None
        for shard in self.shards:
            try:
                with lmdb_env.env(shard).begin(buffers=False) as txn:
                    data = txn.get(key)
            except lmdb.Error as e:  # LMDB found a page of the wrong type: the file was damaged
                raise BadFile(f"{WHAT} {shard} is damaged (record {image_id!r}, flip {int(flipped)}): "
                              f"{type(e).__name__}: {e}; {_fix(self.path)}") from e
            if data is not None:
                break
        if data is None:
            raise MissingEntry(f"no teacher features for image {image_id!r} (flip {flipped}) in {self.path}")
        r = _COUNT.unpack_from(data)[0] if len(data) >= _COUNT.size else -1
        if len(data) != _COUNT.size + r * (4 + 2 * sum(self.widths.values())):
            raise BadFile(f"malformed record {image_id!r} (flip {int(flipped)}) in {WHAT} {shard}: {len(data)} bytes "
                          f"for {r} regions of widths {self.widths}; {_fix(self.path)}")
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


def read_meta(path: Path) -> dict[str, Any] | None:
    """The store's ``meta.json`` (``fingerprint``, ``shards``), or None when there is none or it is unreadable."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and {"fingerprint", "shards"} <= meta.keys() else None


def is_current(path: Path, fingerprint: dict[str, Any]) -> bool:
    """Whether ``path`` holds a finished store computed from ``fingerprint`` whose shards are whole (a damaged
    one is logged, and the store is rebuilt: it is a cache)."""
    meta = read_meta(path)
    if meta is None or meta["fingerprint"] != fingerprint:
        return False
    try:
        for name in meta["shards"]:
            if not (path / name / "data.mdb").is_file():
                raise BadFile(f"{WHAT} {path / name} has no data.mdb")
            lmdb_env.check_data_file(path / name, WHAT)
    except BadFile as e:
        logger.warning(f"{e}; the teacher's region features are computed again")
        return False
    return True


def clear(path: Path) -> None:
    """Remove whatever is at ``path`` (an old or unfinished store) and make it an empty folder."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def write_shard(path: Path, widths: dict[str, int],
                views: Iterable[tuple[str, bool, np.ndarray, dict[str, np.ndarray]]],
                total: int, progress: bool = True) -> None:
    """Write ``views`` (image id, flipped, positions, per-layer features) into the LMDB at ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    lmdb_env.acquire(path, writable=True, what=WHAT, fix=_fix(path.parent))
    try:
        pending: list[tuple[bytes, bytes]] = []
        for image_id, flipped, keep, feats in tqdm(views, total=total, desc="teacher features", unit="view",
                                                   disable=not progress):
            parts = [_COUNT.pack(len(keep)), np.asarray(keep, "<i4").tobytes()]
            parts += [np.asarray(feats[layer], "<f2").tobytes() for layer in widths]
            pending.append((f"{image_id}\t{int(flipped)}".encode(), b"".join(parts)))
            if len(pending) >= 64:
                _put(path, pending)
        _put(path, pending)
    finally:
        lmdb_env.release(path)


def finish(path: Path, fingerprint: dict[str, Any], shards: list[str]) -> None:
    """Mark the store finished: its ``meta.json``, written last (atomically)."""
    write_atomically(path / "meta.json", lambda f: f.write(json.dumps({"fingerprint": fingerprint,
                                                                      "shards": shards}, indent=1).encode()),
                     "teacher feature store")


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
        except lmdb.Error as e:  # a full disk, a file-size limit: the store stays unfinished (no meta.json)
            raise CannotWrite(f"cannot write {WHAT} {path}: {e} (likely cause: {lmdb_env.write_failure_cause(path)}); "
                              "free space (or raise `ulimit -f`, or lower distill.feature_cache_gb) and run again "
                              "with --resume") from e
    pending.clear()
