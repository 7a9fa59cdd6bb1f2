"""Proposals for a whole dataset: a process pool over images, into a resumable (and shardable) LMDB cache.

Workers stamp an image file (size, mtime, a hash of its bytes: checked when the cache is attached), decode it,
run the method and :func:`~mlkd.proposals.methods.clean_boxes`, and send the packed record back; only the parent
writes to LMDB (one writer, batched transactions). An image that cannot be read or processed is reported (and
listed in ``CACHE/failures.json``) without stopping the run; re-running the same command retries exactly the images
not yet cached.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import cv2
from tqdm import tqdm

from mlkd.data.base import MultiLabelDataset, file_stamp, read_image
from mlkd.data.images import check_image_file
from mlkd.errors import BadInput, MlkdError
from mlkd.proposals.cache import ProposalCache, encode_record, make_meta
from mlkd.proposals.methods import CLEAN_DEFAULTS, propose, resolve_params
from mlkd.proposals.shards import shard_indices

_COMMIT_EVERY = 64  # images per LMDB transaction: fewer fsyncs, little work lost on a crash


@dataclass
class GenerateReport:
    """What a :func:`generate_proposals` run did; ``failed`` maps image id -> error message."""

    cache_path: Path
    processed: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    empty: list[str] = field(default_factory=list)  # images computed with zero proposals
    total_boxes: int = 0
    seconds: float = 0.0

    @property
    def mean_boxes(self) -> float:
        return self.total_boxes / self.processed if self.processed else 0.0


# -- worker side: module globals set once per process by the pool initializer ----------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(method: str, params: dict[str, Any], single_thread: bool) -> None:
    if single_thread:
        cv2.setNumThreads(1)  # parallelism comes from the processes; OpenCV threads would oversubscribe
    _WORKER.update(method=method, params=params)


def _propose_one(task: tuple[str, str]) -> tuple[str, bytes | None, int, str | None]:
    """``(image_id, path)`` -> ``(image_id, record, R, None)``, or ``(image_id, None, 0, error)``."""
    image_id, path = task
    try:
        stamp = file_stamp(check_image_file(path))  # before the decode: a write in between leaves a stamp that
        # no longer matches the file, so the cache is refused rather than trusted
        boxes, scores = propose(read_image(path), _WORKER["method"], _WORKER["params"])
    except Exception as e:  # noqa: BLE001 - one bad image must not end a multi-hour run; it is reported
        return image_id, None, 0, str(e) if isinstance(e, MlkdError) else f"{type(e).__name__}: {e}"
    return image_id, encode_record(boxes, scores, stamp), len(boxes), None


def _open_cache(dataset: MultiLabelDataset, method: str, params: dict[str, Any], out: str | Path,
                shard: tuple[int, int] | None) -> ProposalCache:
    meta = make_meta(method, params, dataset.identity.to_dict(), shard)
    return ProposalCache.create(out, meta, resume=True)


def generate_proposals(dataset: MultiLabelDataset, method: str, params: dict[str, Any] | None, out: str | Path,
                       workers: int = 0, shard: tuple[int, int] | None = None, progress: bool = True,
                       chunksize: int | None = None) -> GenerateReport:
    """Compute proposals for every image of ``dataset`` (or of one ``shard``) into the cache at ``out``.

    Args:
        dataset: any :class:`MultiLabelDataset` (only ``records`` are used: ids and paths).
        method: a key of :data:`~mlkd.proposals.methods.METHODS`; params: its keyword arguments plus
            ``max_proposals``, ``min_size``, ``nms_iou`` (see :func:`resolve_params`).
        out: cache directory; an existing cache built with the same settings is resumed (cached images skipped).
        workers: processes; 0 runs in this process (debugging, tiny datasets).
        shard: ``(i, n)`` processes only images with ``index % n == i``; merge shards with ``merge_caches``.

    Returns:
        a :class:`GenerateReport`; failures are also written to ``out/failures.json``.
    """
    if workers < 0:
        raise BadInput(f"workers must be >= 0, got {workers}")
    params = resolve_params(method, params)
    t0 = time.perf_counter()
    with _open_cache(dataset, method, params, out, shard) as cache:
        report = GenerateReport(cache.path)
        records = [dataset.records[i] for i in shard_indices(len(dataset), shard)]
        tasks = [(r.image_id, str(r.path)) for r in records if r.image_id not in cache]
        report.skipped = len(records) - len(tasks)
        pending: list[tuple[str, bytes]] = []
        with _task_runner(method, params, workers if tasks else 0) as run:
            bar = tqdm(total=len(tasks), desc=f"proposals ({method})", unit="img", disable=not progress)
            try:
                for image_id, record, num_boxes, error in run(tasks, chunksize):
                    if error is not None:
                        report.failed[image_id] = error
                    else:
                        pending.append((image_id, record))
                        report.processed += 1
                        report.total_boxes += num_boxes
                        if num_boxes == 0:
                            report.empty.append(image_id)
                    if len(pending) >= _COMMIT_EVERY:
                        cache.put_raw(pending)
                        pending = []
                    bar.update(1)
            finally:  # keep what was computed, also on Ctrl-C: the next run resumes from there
                bar.close()
                cache.put_raw(pending)
        cache.write_failures(report.failed)
    report.seconds = time.perf_counter() - t0
    return report


@contextlib.contextmanager
def _task_runner(method: str, params: dict[str, Any], workers: int):
    """Yield ``run(tasks, chunksize)`` -> worker results in completion order (in-process when ``workers == 0``)."""
    if workers == 0:
        _init_worker(method, params, single_thread=False)
        yield lambda tasks, chunksize: map(_propose_one, tasks)
        return
    ctx = _pool_context()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(method, params, True)) as pool:
        def run(tasks: Sequence[tuple[str, str]], chunksize: int | None):
            chunksize = chunksize or max(1, min(16, len(tasks) // (workers * 8)))
            return pool.imap_unordered(_propose_one, tasks, chunksize=chunksize)
        yield run


def _pool_context() -> mp.context.BaseContext:
    """A forkserver context whose server has imported this module once (spawn where there is no forkserver).

    Plain fork is unsafe here: a parent that has run OpenCV or torch code holds thread pools whose threads do
    not exist in a forked child, and the child deadlocks in its first call into them (``cv2.setNumThreads``
    hangs). The fork server is a fresh single-threaded process, so its children start clean, and the preload
    spares each of them the seconds of importing cv2 and torch.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def default_workers() -> int:
    """One worker per CPU core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
