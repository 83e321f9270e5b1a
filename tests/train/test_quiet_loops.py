"""Event loops made under `quiet_closed_loops()` drop work handed to them after `close()`, where a
default loop raises "Event loop is closed" in the caller's thread (TensorStore's, after a failed
checkpoint restore); the policy is put back afterwards."""

from __future__ import annotations

import asyncio
import threading

import pytest

from qkd_jax.train.quiet_loops import QuietClosedLoop, quiet_closed_loops


def _call_from_another_thread(loop) -> list:
    outcome = []

    def late_reader():
        try:
            outcome.append(loop.call_soon_threadsafe(print, "never runs"))
        except RuntimeError as err:
            outcome.append(err)

    thread = threading.Thread(target=late_reader)
    thread.start()
    thread.join()
    return outcome


def test_a_closed_quiet_loop_drops_late_callbacks_and_a_default_one_raises():
    before = asyncio.get_event_loop_policy()
    with quiet_closed_loops():
        loop = asyncio.new_event_loop()
    assert asyncio.get_event_loop_policy() is before
    assert isinstance(loop, QuietClosedLoop)
    ran = []
    assert loop.run_until_complete(asyncio.sleep(0, result=7)) == 7  # an ordinary loop while open
    loop.call_soon_threadsafe(ran.append, 1)
    loop.run_until_complete(asyncio.sleep(0))
    assert ran == [1]
    loop.close()
    assert _call_from_another_thread(loop) == [None]

    default = asyncio.new_event_loop()
    assert not isinstance(default, QuietClosedLoop)
    default.close()
    (err,) = _call_from_another_thread(default)
    with pytest.raises(RuntimeError, match="Event loop is closed"):
        raise err
