"""Dynamic batching: the images of requests that arrive close together run as one batch on one runner thread.

The event loop only queues images and waits on futures; the model runs in a single worker thread, so the loop
keeps accepting, parsing and answering requests while a batch runs, and the model is never used by two threads
at once. A batch starts with the first image waiting and takes every image that arrives within ``max_wait_ms`` of
it, up to ``max_batch``; images queued while a batch runs start the next one at once. A request whose client
went away (its task cancelled) leaves its images behind, and they are dropped before the batch runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from mlkd.errors import MlkdError


class QueueFull(MlkdError):
    """More images are waiting than the queue may hold: answered 503 with Retry-After."""


@dataclasses.dataclass
class _Item:
    value: Any
    future: asyncio.Future


class Batcher:
    """``await batcher.submit(values)`` returns ``run(batch)``'s rows for ``values``, batched with other requests'.

    ``run(values) -> rows`` is called in the runner thread with at most ``max_batch`` values and must return one
    row per value (anything indexable). ``observe(batch_size)`` is told each batch's size, ``depth(n)`` the
    number of values waiting whenever it changes (both for metrics)."""

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256, observe: Callable[[int], None] = lambda n: None,
                 depth: Callable[[int], None] = lambda n: None) -> None:
        self.run, self.max_batch, self.max_wait, self.max_queue = run, max_batch, max_wait_ms / 1000, max_queue
        self.observe, self.report_depth = observe, depth
        self.waiting = 0
        self.batches = 0
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="mlkd-runner")

    async def start(self) -> None:
        """Start the batching task on the running loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def stop(self) -> None:
        """Stop batching; waiting requests get ``QueueFull`` (the server is going away); the runner is joined."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(QueueFull("the server is stopping"))
        self._runner.shutdown(wait=True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the runner thread, between batches (for work that is not batched: detection)."""
        return await asyncio.get_running_loop().run_in_executor(self._runner, fn, *args)

    async def submit(self, values: Sequence[Any]) -> list[Any]:
        """The rows of ``values``, in order; ``QueueFull`` when they would not fit in the queue (nothing queued)."""
        if self._queue is None:
            raise QueueFull("the server is not started")
        if self.waiting + len(values) > self.max_queue:
            raise QueueFull(f"{self.waiting} image(s) waiting, at most {self.max_queue} may; retry shortly")
        loop = asyncio.get_running_loop()
        items = [_Item(v, loop.create_future()) for v in values]
        for item in items:
            self._queue.put_nowait(item)
        self._moved(len(items))
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:  # cancelled (client gone) or failed: the items not yet run are skipped by the batch
            for item in items:
                item.future.cancel()

    def _moved(self, change: int) -> None:
        self.waiting += change
        self.report_depth(self.waiting)

    async def _next_batch(self) -> list[_Item]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except TimeoutError:
                break
        self._moved(-len(batch))
        return [item for item in batch if not item.future.done()]

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batches += 1
            self.observe(len(batch))
            try:
                rows = await loop.run_in_executor(self._runner, self.run, [item.value for item in batch])
            except Exception as e:  # the model failed: every request of the batch gets the error
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(e)
                continue
            for item, row in zip(batch, rows):
                if not item.future.done():
                    item.future.set_result(row)
