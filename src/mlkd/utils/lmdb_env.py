"""LMDB environments shared in a process: one reference-counted handle per directory, safe across fork.

py-lmdb refuses to open one environment twice in a process, and LMDB handles must not be used (or closed)
across fork. So each process shares one handle per directory (:func:`acquire` / :func:`env` / :func:`release`),
and read-only handles are closed just before this process forks (a DataLoader starting its workers): neither
side inherits an open environment, and both reopen it on their next read. Proposal caches and the teacher's
feature store use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import lmdb

from mlkd.errors import BadFile

INITIAL_MAP_SIZE = 1 << 30  # grown on demand: some file systems allocate the whole map up front


@dataclass
class _Handle:
    writable: bool
    env: lmdb.Environment | None
    users: int


_ENVS: dict[str, _Handle] = {}
_INHERITED: list[lmdb.Environment] = []  # a parent's writable handles seen after fork: kept alive, never touched


def _open(key: str, writable: bool) -> lmdb.Environment:
    try:
        if writable:
            return lmdb.open(key, map_size=INITIAL_MAP_SIZE, subdir=True)
        return lmdb.open(key, readonly=True, lock=False, readahead=False, subdir=True)
    except lmdb.Error as e:
        raise BadFile(f"cannot open the LMDB store {key}: {e}") from e


def acquire(path: Path, writable: bool) -> None:
    """Open (or share) the environment of ``path``; every call needs a :func:`release`."""
    key = os.path.abspath(path)
    handle = _ENVS.get(key)
    if handle is None:
        _ENVS[key] = _Handle(writable, _open(key, writable), 1)
    elif writable and not handle.writable:
        raise OSError(f"LMDB store {path} is open read-only in this process; close it before writing")
    else:
        handle.users += 1


def env(path: Path) -> lmdb.Environment:
    """The open environment of an acquired directory, reopened if a fork closed it."""
    handle = _ENVS[os.path.abspath(path)]
    if handle.env is None:
        handle.env = _open(os.path.abspath(path), handle.writable)
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
