"""An LMDB cache of object proposals, keyed by image id, with a ``meta.json`` saying what it holds.

On disk a cache is a directory::

    CACHE/data.mdb, CACHE/lock.mdb   one record per image: the image id (UTF-8) -> packed proposals
    CACHE/meta.json                  method, parameters, dataset identity, image count, box convention, version
    CACHE/failures.json              (optional) images the last generation run could not process

A record is a 12-byte little-endian header (magic ``MLKP``, record version uint32, R uint32) followed by
``R*4`` float32 boxes ``(x1, y1, x2, y2)`` (see :mod:`mlkd.proposals.methods` for the convention) and ``R``
float32 scores. ``R = 0`` is a valid record (an image with no proposal). A version-2 record (written by
generation) ends with the :class:`~mlkd.data.base.FileStamp` of the image file it was computed from: size
uint64, mtime_ns int64 and the 32-byte SHA-256 of its bytes.

Which dataset a cache belongs to is decided by its images only (``meta.json`` version 2 and 3): the number of
images and the hash of their ids and file names (:func:`mlkd.data.base.images_hash`), then, where records carry
one, each image's file stamp (:func:`mlkd.proposals.attach.check_cache_matches`). Proposals do not depend on
labels, so a dataset opened with another label policy (VOC ``difficult=positive``, COCO ``crowd=ignore``) uses the
same cache. Version-1 caches (mlkd 0.1) recorded only a hash that covers labels too, and are checked against it.
Meta version 3 says that records may be version 2; a version-2 cache is upgraded when generation resumes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator

import lmdb
import numpy as np

from mlkd.data.base import BOX_CONVENTION, FileStamp
from mlkd.errors import BadFile, BadInput, CannotWrite, MissingEntry, NotFound
from mlkd.utils import lmdb_env

FORMAT = "mlkd-proposals"
# meta.json: v1 = the dataset is matched by its images and labels; v2 = by its images; v3 = records may carry
# their image's file stamp (it is checked when the cache is attached)
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
RECORD_VERSION = 2  # of the packed records in data.mdb: 1 = boxes and scores, 2 = then the image's file stamp
IMAGE_FIELDS = ("num_images", "images_hash")  # the dataset identity fields a v2 cache must match
META_KEYS = ("format", "version", "method", "params", "dataset", "num_images", "box_convention", "shard")
_HEADER = struct.Struct("<4sII")
_STAMP = struct.Struct("<Qq32s")  # size, mtime_ns, SHA-256 of the image file
_TRAILER = {1: 0, 2: _STAMP.size}  # record version -> bytes after the scores
_MAGIC = b"MLKP"


def encode_record(boxes: np.ndarray, scores: np.ndarray, stamp: FileStamp | None = None) -> bytes:
    """Pack ``boxes (R, 4)`` and ``scores (R,)`` (any real dtype) into one record; with the ``stamp`` of the
    image file they were computed from, a version-2 record (a version-1 one without)."""
    boxes = np.asarray(boxes, dtype="<f4")
    scores = np.asarray(scores, dtype="<f4")
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise BadInput(f"boxes must have shape (R, 4), got {boxes.shape}")
    if scores.shape != (len(boxes),):
        raise BadInput(f"scores must have shape ({len(boxes)},) to match boxes, got {scores.shape}")
    tail = b"" if stamp is None else _STAMP.pack(stamp.size, stamp.mtime_ns, stamp.digest)
    return _HEADER.pack(_MAGIC, 1 if stamp is None else 2, len(boxes)) + boxes.tobytes() + scores.tobytes() + tail


def _record_size(data: bytes | memoryview, where: str, fix: str) -> tuple[int, int]:
    """``(record version, R)`` of a record whose header and length agree, else a ``BadFile`` naming it."""
    if len(data) < _HEADER.size:
        raise BadFile(f"malformed proposal record {where}: {len(data)} bytes, shorter than the header{fix}")
    magic, version, r = _HEADER.unpack_from(data)
    if magic != _MAGIC or version not in _TRAILER:
        raise BadFile(f"malformed proposal record {where}: header {magic!r} v{version}, expected {_MAGIC!r} "
                      f"v{' or v'.join(map(str, _TRAILER))}{fix}")
    if len(data) != _HEADER.size + 20 * r + _TRAILER[version]:
        raise BadFile(f"malformed proposal record {where}: {len(data)} bytes for R={r} "
                      f"(expected {_HEADER.size + 20 * r + _TRAILER[version]}){fix}")
    return version, r


def decode_record(data: bytes, where: str, fix: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Unpack a record into ``boxes (R, 4)`` and ``scores (R,)`` float32 (writable copies); ``where`` names it
    and ``fix`` (``"; do this"``) ends the message of a malformed one."""
    _, r = _record_size(data, where, fix)
    flat = np.frombuffer(data, dtype="<f4", count=5 * r, offset=_HEADER.size)
    return flat[: 4 * r].reshape(r, 4).astype(np.float32), flat[4 * r:].astype(np.float32)


def record_stamp(data: bytes | memoryview, where: str, fix: str = "") -> FileStamp | None:
    """The image file stamp a version-2 record ends with (None for a version-1 record)."""
    version, _ = _record_size(data, where, fix)
    if version < 2:
        return None
    size, mtime_ns, digest = _STAMP.unpack_from(data, len(data) - _STAMP.size)
    return FileStamp(size, mtime_ns, digest)


def make_meta(method: str, params: dict[str, Any], dataset: dict[str, Any],
              shard: tuple[int, int] | None = None) -> dict[str, Any]:
    """The ``meta.json`` content of a new cache; ``dataset`` is ``DatasetIdentity.to_dict()`` of the full dataset."""
    return {"format": FORMAT, "version": VERSION, "method": method, "params": dict(params), "dataset": dataset,
            "num_images": 0, "box_convention": BOX_CONVENTION,
            "shard": None if shard is None else {"index": shard[0], "count": shard[1]}}


def meta_differences(a: dict[str, Any], b: dict[str, Any],
                     ignore: tuple[str, ...] = ("num_images", "empty_images")) -> list[str]:
    """``key: a != b`` lines for every meta field that differs (apart from ``ignore``). Of the dataset identity
    only the images count (:data:`IMAGE_FIELDS`): labels and class names do not change proposals."""
    keys = sorted((set(a) | set(b)) - set(ignore))
    out = []
    for k in keys:
        x, y = a.get(k), b.get(k)
        if k == "dataset" and isinstance(x, dict) and isinstance(y, dict):
            x, y = ({f: d.get(f) for f in IMAGE_FIELDS} for d in (x, y))
        if isinstance(x, dict) and isinstance(y, dict):  # name the nested field, not the whole dict
            out += [f"{k}.{line}" for line in meta_differences(x, y, ignore=())]
        elif x != y:
            out.append(f"{k}: {x!r} != {y!r}")
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and validate ``path/meta.json``; clear errors for a missing, unparsable or incomplete file."""
    meta_path = Path(path) / "meta.json"
    if not meta_path.is_file():
        raise NotFound(f"not a proposal cache: {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"corrupt proposal cache meta {meta_path}: {e}") from e
    if not isinstance(meta, dict):
        raise BadInput(f"corrupt proposal cache meta {meta_path}: expected a JSON object")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise BadInput(f"corrupt proposal cache meta {meta_path}: missing keys {missing}")
    if meta["format"] != FORMAT or meta["version"] not in READABLE_VERSIONS:
        raise BadInput(f"{meta_path} is format {meta['format']!r} v{meta['version']}; "
                         f"this mlkd reads {FORMAT!r} v{', v'.join(map(str, READABLE_VERSIONS))}")
    needed = ("name", "split", "classes", "num_images") + (("images_hash",) if meta["version"] >= 2 else ("manifest_hash",))
    ds_missing = [k for k in needed if not isinstance(meta["dataset"], dict) or k not in meta["dataset"]]
    if ds_missing:
        raise BadInput(f"corrupt proposal cache meta {meta_path}: dataset identity lacks {ds_missing}")
    return meta


def rebuild_hint(path: str | Path, meta: dict[str, Any]) -> str:
    """How to get a good cache back: the command that builds (or imports) it again into a fresh folder."""
    method = str(meta.get("method"))
    if method.startswith("import:"):
        return (f"remove the folder and import it again with `mlkd proposals import --format {method[7:]} --file "
                f"FILE --dataset SPEC --out {path}` (FILE is params.source in its meta.json)")
    return (f"remove the folder and build it again with `mlkd proposals --dataset SPEC --method {method} --out "
            f"{path}` (the parameters are in its meta.json)")


def _resumable(meta: dict[str, Any]) -> dict[str, Any]:
    """A version-2 cache takes records with file stamps beside its old ones when resumed: it becomes version 3."""
    return {**meta, "version": VERSION} if meta["version"] == 2 else meta


class ProposalCache:
    """Proposals of one dataset (or one shard of it): ``get(image_id) -> (boxes (R, 4), scores (R,))``.

    Build with :meth:`create` (writable) or :meth:`open` (read-only). A read-only cache can be pickled into
    DataLoader workers: each process opens its own LMDB environment on first use (LMDB handles must not
    cross ``fork``).
    """

    def __init__(self, path: Path, meta: dict[str, Any], writable: bool) -> None:
        self.path, self.meta, self.writable = path, meta, writable
        self._acquired = False
        self._pid = os.getpid()

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any], resume: bool = False) -> "ProposalCache":
        """A writable cache at ``path``. An existing cache is reopened only with ``resume=True`` and the same
        meta (apart from ``num_images``); otherwise a ``ValueError`` names the differing fields."""
        path = Path(path)
        if (path / "meta.json").exists():
            if not resume:
                raise BadInput(f"proposal cache {path} already exists; choose another --out or remove it")
            old = read_meta(path)
            diffs = meta_differences(_resumable(old), _resumable(meta))
            if diffs:
                raise BadInput(f"proposal cache {path} was built with other settings, so it cannot be resumed "
                                 "(existing != requested):\n  " + "\n  ".join(diffs))
            if (path / "data.mdb").is_file():
                with cls.open(path):  # refuse a damaged cache before LMDB writes into it
                    pass
            meta = _resumable(old)
        elif path.exists() and any(path.iterdir()):
            raise BadInput(f"{path} exists and is not a proposal cache (no meta.json); choose an empty --out")
        path.mkdir(parents=True, exist_ok=True)
        cache = cls(path, dict(meta), writable=True)
        cache.write_meta()
        return cache

    @classmethod
    def open(cls, path: str | Path) -> "ProposalCache":
        """Open an existing cache read-only (validates ``meta.json`` and the LMDB files)."""
        path = Path(path)
        meta = read_meta(path)
        if not (path / "data.mdb").is_file():
            raise NotFound(f"proposal cache {path} has meta.json but no data.mdb")
        cache = cls(path, meta, writable=False)
        cache._open_env()  # refuses a truncated or foreign data.mdb before LMDB maps it (lmdb_env.check_data_file)
        return cache

    # -- LMDB handle, one per process ------------------------------------------------------------------------
    def _open_env(self) -> lmdb.Environment:
        if self._pid != os.getpid():
            if self.writable:
                raise RuntimeError("a writable ProposalCache cannot be used from a forked process")
            self._acquired, self._pid = False, os.getpid()
        if not self._acquired:
            lmdb_env.acquire(self.path, self.writable, "proposal cache", rebuild_hint(self.path, self.meta))
            self._acquired = True
        return lmdb_env.env(self.path)

    @contextlib.contextmanager
    def _reading(self, image_id: str | None = None) -> Iterator[None]:
        """LMDB's own errors while reading (a page of the wrong type) mean a damaged file: a ``BadFile`` naming
        the cache, the record where known, and how to rebuild it."""
        try:
            yield
        except lmdb.Error as e:
            at = "" if image_id is None else f" (record {image_id!r})"
            raise BadFile(f"proposal cache {self.path} is damaged{at}: {type(e).__name__}: {e}; "
                          f"{rebuild_hint(self.path, self.meta)}") from e

    def __getstate__(self) -> dict[str, Any]:
        if self.writable:
            raise TypeError("a writable ProposalCache cannot be pickled; open it read-only with ProposalCache.open")
        return {"path": self.path, "meta": self.meta}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["meta"], writable=False)

    def close(self) -> None:
        if self._acquired and self._pid == os.getpid():
            lmdb_env.release(self.path)
        self._acquired = False

    def __del__(self) -> None:  # a reader nobody holds any more gives its share of the process's handle back
        if getattr(self, "_acquired", False) and not self.writable:
            self.close()

    def __enter__(self) -> "ProposalCache":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writable:
            self.write_meta()
        self.close()

    # -- reading --------------------------------------------------------------------------------------------
    def get(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Proposals of ``image_id``: boxes ``(R, 4)`` float32 ``(x1, y1, x2, y2)``, scores ``(R,)`` float32."""
        with self._reading(image_id), self._open_env().begin(buffers=False) as txn:
            data = txn.get(str(image_id).encode())
        if data is None:
            raise MissingEntry(f"image id {image_id!r} is not in proposal cache {self.path} ({len(self)} images)")
        return decode_record(data, f"{image_id!r} in {self.path}", f"; {rebuild_hint(self.path, self.meta)}")

    def __contains__(self, image_id: object) -> bool:
        with self._reading(str(image_id)), self._open_env().begin() as txn:
            return txn.get(str(image_id).encode()) is not None

    def __len__(self) -> int:
        with self._reading():
            return int(self._open_env().stat()["entries"])

    def keys(self) -> Iterator[str]:
        """Every image id in the cache (LMDB byte order)."""
        with self._reading(), self._open_env().begin() as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                yield self._image_id(key)

    def items(self) -> Iterator[tuple[str, bytes]]:
        """``(image_id, raw record)`` pairs, for copying between caches without decoding."""
        with self._reading(), self._open_env().begin() as txn:
            for key, value in txn.cursor():
                yield self._image_id(key), bytes(value)

    def _image_id(self, key: bytes | memoryview) -> str:
        try:
            return bytes(key).decode()
        except UnicodeDecodeError as e:  # mlkd writes UTF-8 ids only: bytes changed on disk
            raise BadFile(f"proposal cache {self.path} is damaged: record key {bytes(key)!r} is not UTF-8 text "
                          f"({e.reason} at byte {e.start}); {rebuild_hint(self.path, self.meta)}") from e

    def stamps(self) -> dict[str, FileStamp]:
        """``image id -> FileStamp`` of the image file each version-2 record was computed from (version-1
        records, written by imports and by caches of meta version 1 and 2, have none). Reads only the end of
        each record."""
        out, fix = {}, f"; {rebuild_hint(self.path, self.meta)}"
        with self._reading(), self._open_env().begin(buffers=True) as txn:
            for key, value in txn.cursor():
                image_id = self._image_id(key)
                stamp = record_stamp(value, f"{image_id!r} in {self.path}", fix)
                if stamp is not None:
                    out[image_id] = stamp
        return out

    # -- writing --------------------------------------------------------------------------------------------
    def put(self, image_id: str, boxes: np.ndarray, scores: np.ndarray) -> None:
        """Store (or replace) one image's proposals."""
        self.put_many([(image_id, boxes, scores)])

    def put_many(self, items: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """Store several images in one transaction (much faster than one :meth:`put` each)."""
        self.put_raw([(image_id, encode_record(b, s)) for image_id, b, s in items])

    def put_raw(self, records: list[tuple[str, bytes]]) -> None:
        """Store already-encoded records; grows the LMDB map when it is full. Images stored with zero proposals
        are listed in the meta (``empty_images``), so a split can be checked without reading every record."""
        if not self.writable:
            raise PermissionError(f"proposal cache {self.path} is open read-only")
        empty = set(self.meta.get("empty_images", []))
        for image_id, data in records:
            (empty.add if _HEADER.unpack_from(data)[2] == 0 else empty.discard)(image_id)
        self.meta["empty_images"] = sorted(empty)
        env = self._open_env()
        while True:
            try:
                with env.begin(write=True) as txn:
                    for image_id, data in records:
                        txn.put(str(image_id).encode(), data)
                return
            except lmdb.MapFullError:
                env.set_mapsize(env.info()["map_size"] * 2)
            except lmdb.Error as e:  # a full disk, a file-size limit (`ulimit -f`): the transaction is not committed
                raise self._cannot_write(e) from e

    def _cannot_write(self, e: Exception) -> CannotWrite:
        return CannotWrite(f"cannot write proposal cache {self.path}: {e} (likely cause: "
                           f"{lmdb_env.write_failure_cause(self.path)}); what was committed before is kept: free space "
                           "(or raise the file-size limit, `ulimit -f`) and run the command again (generation "
                           "resumes from there)")

    def write_meta(self) -> None:
        """Write ``meta.json`` with the current image count (atomically: write then rename)."""
        if self._acquired or (self.path / "data.mdb").exists():
            self.meta["num_images"] = len(self)
        tmp = self.path / "meta.json.tmp"
        try:
            tmp.write_text(json.dumps(self.meta, indent=2) + "\n")
            tmp.replace(self.path / "meta.json")
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise self._cannot_write(e) from e

    def read_failures(self) -> dict[str, str]:
        """``image_id -> error`` of the last generation run (empty when there were none)."""
        f = self.path / "failures.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def write_failures(self, failures: dict[str, str]) -> None:
        """Record the images a run could not process (removes the file when there are none)."""
        f = self.path / "failures.json"
        if failures:
            f.write_text(json.dumps(failures, indent=2, sort_keys=True) + "\n")
        elif f.exists():
            f.unlink()

    def __repr__(self) -> str:
        return f"ProposalCache({str(self.path)!r}, method={self.meta.get('method')!r}, images={self.meta.get('num_images')})"
