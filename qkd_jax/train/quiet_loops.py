"""Event loops that ignore work handed to them after they were closed, for checkpoint restores.

orbax runs each restore in a fresh asyncio event loop and closes it when the restore returns or
fails. After a failed restore (a damaged checkpoint), TensorStore reads that were still in flight
finish in TensorStore's threads and call `loop.call_soon_threadsafe` on that closed loop; each call
raises "RuntimeError: Event loop is closed", which TensorStore prints as a traceback on stderr
(dozens of them, interleaved, before the run's own one-line error). Nothing waits for that work
any more, so dropping it is what the closed loop should do: `quiet_closed_loops()` makes the loops
created while it is active do exactly that, and nothing else differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Iterator

_lock = threading.Lock()


class QuietClosedLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose `call_soon_threadsafe` after `close()` drops the callback."""

    def call_soon_threadsafe(self, callback, *args, context=None):
        if self.is_closed():
            return None  # late work for a finished (or failed) run_until_complete: nobody waits for it
        return super().call_soon_threadsafe(callback, *args, context=context)


class _QuietPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return QuietClosedLoop()


@contextlib.contextmanager
def quiet_closed_loops() -> Iterator[None]:
    """While active, `asyncio.new_event_loop()` returns a QuietClosedLoop (the previous event loop
    policy is put back afterwards; the loops made meanwhile keep their behaviour)."""
    with _lock:
        previous = asyncio.get_event_loop_policy()
        asyncio.set_event_loop_policy(_QuietPolicy())
        try:
            yield
        finally:
            asyncio.set_event_loop_policy(previous)
