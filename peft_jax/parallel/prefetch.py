"""Input prefetching: host batches sharded onto the devices by a background thread.

:class:`DevicePrefetcher` wraps a batch iterator and a ``shard`` function (host batch ->
device arrays, e.g. ``lambda b: mesh.shard_batch(b, mesh)``) and keeps ``depth`` device
batches ready, so the host work (collation, padding, transfer) of step ``t + 1`` overlaps
the device work of step ``t``. If the wrapped iterator has ``get_state()`` (the data
pipeline's position for checkpoints), the prefetcher's ``get_state()`` returns the
position *after the batches handed out so far*, not after the ones read ahead, so a
checkpoint taken mid-run resumes exactly.
"""

from __future__ import annotations

import copy
import queue
import threading
from typing import Any, Callable, Iterator, Optional

_END = object()


class DevicePrefetcher:
    """Iterator of ``shard(batch)`` for each batch of ``batches``, ``depth`` ahead.

    Exceptions raised by the iterator or by ``shard`` in the background thread are re-raised
    by ``next()`` in the caller. ``close()`` stops the thread (also on garbage collection of
    a finished iterator; the thread is a daemon).
    """

    def __init__(self, batches: Iterator[Any], shard: Callable[[Any], Any], depth: int = 2):
        if depth < 1:
            raise ValueError(f"DevicePrefetcher: depth={depth!r} must be >= 1")
        self._it = iter(batches)
        self._src = batches
        self._shard = shard
        self._q: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._state: Optional[Any] = batches.get_state() if hasattr(batches, "get_state") else None
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        has_state = hasattr(self._src, "get_state")
        try:
            while not self._stop.is_set():
                try:
                    b = next(self._it)
                except StopIteration:
                    break
                state = copy.deepcopy(self._src.get_state()) if has_state else None
                item = (self._shard(b), state)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer
            self._q.put(("__error__", e))
            return
        self._q.put(_END)

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is _END:
            self._q.put(_END)  # later next() calls stop too
            raise StopIteration
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) \
                and item[0] == "__error__":
            raise item[1]
        batch, state = item
        self._state = state
        return batch

    def get_state(self) -> Any:
        """The wrapped iterator's state after the batches returned so far (None without one)."""
        return self._state

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
