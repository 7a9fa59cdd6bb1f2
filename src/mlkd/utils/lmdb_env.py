"""LMDB environments shared in a process: one reference-counted handle per directory, safe across fork.

py-lmdb refuses to open one environment twice in a process, and LMDB handles must not be used (or closed)
across fork. So each process shares one handle per directory (:func:`acquire` / :func:`env` / :func:`release`),
and read-only handles are closed just before this process forks (a DataLoader starting its workers): neither
side inherits an open environment, and both reopen it on their next read. Proposal caches and the teacher's
feature store use it.

Every open first checks ``data.mdb`` against LMDB's own header (:func:`check_data_file`): LMDB maps the file, so
a file cut short (a full disk, an interrupted copy) would end the process with a bus error on the first read
past its end, with no message.
"""

from __future__ import annotations

import gc
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import lmdb

from mlkd.errors import BadFile, CannotWrite

try:
    import resource  # POSIX: the file-size limit, named when a write fails
except ImportError:
    resource = None

INITIAL_MAP_SIZE = 1 << 30  # grown on demand: some file systems allocate the whole map up front

# LMDB's data file (format 1, 64-bit builds): pages 0 and 1 are meta pages. After a 16-byte page header, a meta
# page holds magic, version, address, map size, the free-list and main DB records (the free one's first field is
# the page size), the last page number and the transaction id; the meta with the larger txnid is current.
_MAGIC, _DATA_VERSION, _META_AT = 0xBEEFC0DE, 1, 16
_META = struct.Struct("=IIQQI92xQQ")  # magic, version, address, map size, page size, (DB records), last page, txnid


@dataclass
class _Handle:
    writable: bool
    env: lmdb.Environment | None
    users: int
    what: str  # for messages: what the store is ("proposal cache")
    fix: str  # and what to do about a damaged one


_ENVS: dict[str, _Handle] = {}
_INHERITED: list[lmdb.Environment] = []  # a parent's writable handles seen after fork: kept alive, never touched


def _meta_pages(f, size: int) -> list[tuple[int, int, int, int]]:
    """``(page size, map size, last page, txnid)`` of both meta pages of an open data file, or ``[]`` when page 0
    is not an LMDB meta page; a damaged page 1 is left out."""
    f.seek(_META_AT)
    head = f.read(_META.size)
    if len(head) < _META.size:
        return []
    magic, version, _, mapsize, psize, last, txnid = _META.unpack(head)
    if magic != _MAGIC or version != _DATA_VERSION or psize < 512 or psize > 1 << 16 or psize & (psize - 1):
        return []
    metas = [(psize, mapsize, last, txnid)]
    if size >= 2 * psize:
        f.seek(psize + _META_AT)
        magic, version, _, mapsize1, psize1, last1, txnid1 = _META.unpack(f.read(_META.size))
        if magic == _MAGIC and version == _DATA_VERSION and psize1 == psize:
            metas.append((psize, mapsize1, last1, txnid1))
    return metas


def check_data_file(path: str | Path, what: str = "LMDB store", fix: str = "") -> None:
    """Refuse ``path/data.mdb`` before LMDB maps it when it is empty, not an LMDB file, or shorter than the pages
    its current meta page says are in use; a ``BadFile`` names the file, the sizes and ``fix`` (what to do). A
    missing file is a new store and passes. Only plain reads of the first two pages: nothing is mapped."""
    data = Path(path) / "data.mdb"
    try:
        size = data.stat().st_size
        with open(data, "rb") as f:
            metas = _meta_pages(f, size)
    except FileNotFoundError:
        return
    except OSError as e:
        raise BadFile(f"{what} {path} cannot be read: {data}: {e.strerror}{_then(fix)}") from e
    if size == 0 or not metas:
        found = "is empty (0 bytes)" if size == 0 else "does not start with an LMDB meta page"
        raise BadFile(f"{what} {path} is damaged: {data} {found}{_then(fix)}")
    psize, mapsize, last, _ = max(metas, key=lambda m: m[3])
    need = max(2, last + 1) * psize
    if need > mapsize:  # LMDB never writes past its map: the header itself was damaged
        raise BadFile(f"{what} {path} is damaged: the header of {data} refers to {need} bytes, beyond its map size "
                      f"{mapsize}{_then(fix)}")
    if size < need:
        raise BadFile(f"{what} {path} is damaged: data.mdb has {size} bytes but its index refers to {need} (the "
                      f"file was cut short, e.g. by a full disk or an interrupted copy){_then(fix)}")


def write_failure_cause(path: str | Path) -> str:
    """Why a write into ``path/data.mdb`` most likely failed, for the message: LMDB reports a write cut short by
    a file-size limit or a full disk only as an I/O error."""
    data = Path(path) / "data.mdb"
    size = data.stat().st_size if data.exists() else 0
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0] if resource is not None else -1
    if limit not in (-1, getattr(resource, "RLIM_INFINITY", -1)) and size + (1 << 20) > limit:
        return f"data.mdb ({size} bytes) reached the file-size limit of {limit} bytes (`ulimit -f`)"
    st = os.statvfs(path)
    if st.f_bavail * st.f_frsize < (1 << 20):
        return f"the disk holding {path} is full ({st.f_bavail * st.f_frsize} bytes free)"
    return "an I/O error of the disk or file system"


def _open(key: str, handle: _Handle) -> lmdb.Environment:
    data = os.path.join(key, "data.mdb")
    if not (handle.writable and os.path.isfile(data) and os.path.getsize(data) == 0):  # a writer starts it afresh
        check_data_file(key, handle.what, handle.fix)
    try:
        if handle.writable:
            return lmdb.open(key, map_size=INITIAL_MAP_SIZE, subdir=True)
        return lmdb.open(key, readonly=True, lock=False, readahead=False, subdir=True)
    except lmdb.Error as e:
        if handle.writable:
            raise CannotWrite(f"cannot write {handle.what} {key}: {e}") from e
        raise BadFile(f"cannot open {handle.what} {key}: {e}{_then(handle.fix)}") from e


def _then(fix: str) -> str:
    return f"; {fix}" if fix else ""


def acquire(path: Path, writable: bool, what: str = "LMDB store", fix: str = "") -> None:
    """Open (or share) the environment of ``path``; every call needs a :func:`release`. ``what`` names the
    store in messages (``"proposal cache"``) and ``fix`` says what to do about a damaged one."""
    key = os.path.abspath(path)
    handle = _ENVS.get(key)
    if handle is not None and writable and not handle.writable:
        gc.collect()  # readers nobody holds any more (e.g. in reference cycles) release their share when collected
        handle = _ENVS.get(key)
    if handle is None:
        handle = _Handle(writable, None, 1, what, fix)
        handle.env = _open(key, handle)
        _ENVS[key] = handle
    elif writable and not handle.writable:
        raise OSError(f"LMDB store {path} is open read-only in this process; close it before writing")
    else:
        handle.users += 1


def env(path: Path) -> lmdb.Environment:
    """The open environment of an acquired directory, reopened if a fork closed it."""
    handle = _ENVS[os.path.abspath(path)]
    if handle.env is None:
        handle.env = _open(os.path.abspath(path), handle)
    return handle.env


def release(path: Path) -> None:
    key = os.path.abspath(path)
    handle = _ENVS.get(key)
    if handle is None:  # acquired before a fork, released in the child: nothing of it is open here
        return
    handle.users -= 1
    if handle.users == 0:
        del _ENVS[key]
        if handle.env is not None:
            handle.env.close()


def _close_readonly_before_fork() -> None:
    for handle in _ENVS.values():
        if not handle.writable and handle.env is not None:
            handle.env.close()
            handle.env = None


def _forget_in_child() -> None:
    _INHERITED.extend(h.env for h in _ENVS.values() if h.env is not None)
    _ENVS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_close_readonly_before_fork, after_in_child=_forget_in_child)
