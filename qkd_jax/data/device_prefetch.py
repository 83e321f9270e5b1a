"""Double buffering onto the accelerator: put the next batches on the device while a step runs.

`DevicePrefetch(iterator, put, size)` keeps `size` batches already handed to `put` (e.g.
`train.parallel.shard_batch`, an asynchronous `jax.device_put`) ahead of the one it returns.
Its state is the wrapped iterator's state before the next batch it will return, so a checkpoint
taken mid-stream resumes at exactly that batch, whatever is in flight.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any


class DevicePrefetch:
    """Iterator of `put(batch)` over `iterator` (which has get_state/set_state), `size` ahead."""

    def __init__(self, iterator: Iterator, put: Callable[[Any], Any], size: int):
        if size < 0:
            raise ValueError(f"prefetch size must be >= 0 (0 = no prefetch), got {size}")
        self._it, self._put, self._size = iterator, put, size
        self._queue: collections.deque = collections.deque()  # (state before batch, put batch)

    def __iter__(self) -> DevicePrefetch:
        return self

    def _fill(self, n: int) -> None:
        while len(self._queue) < n:
            state = self._it.get_state()
            try:
                batch = next(self._it)
            except StopIteration:
                return
            self._queue.append((state, self._put(batch)))

    def __next__(self) -> Any:
        self._fill(self._size + 1)
        if not self._queue:
            raise StopIteration
        return self._queue.popleft()[1]

    def get_state(self) -> Any:
        """The state of the wrapped iterator before the next batch this one returns."""
        return self._queue[0][0] if self._queue else self._it.get_state()

    def set_state(self, state: Any) -> None:
        self._queue.clear()
        self._it.set_state(state)

    def close(self) -> None:
        self._queue.clear()
        if hasattr(self._it, "close"):
            self._it.close()
