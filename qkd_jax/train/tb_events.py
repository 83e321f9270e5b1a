"""TensorBoard scalar events written and flushed in the calling thread.

tensorboardX's `SummaryWriter` hands each event to a background thread through a queue, and its
`flush()` flushes only the file: events still in the queue are lost when the process is killed,
although `flush()` returned. The metrics writer promises that every logged record is on disk
(readable after a SIGKILL), so it writes its scalars with tensorboardX's synchronous event-file
writer instead (same file format and name, same `gs://`/`s3://` support).
"""

from __future__ import annotations

import os
import time
from typing import Mapping


class ScalarEventWriter:
    """One event file in `directory` (events.out.tfevents.<time>.<host>); `add_scalars` returns
    once the events are written and the file flushed."""

    def __init__(self, directory: str):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.record_writer import directory_check

        directory_check(directory)
        self._events = EventsWriter(os.path.join(directory, "events"))

    def add_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        now = time.time()
        for tag, value in scalars.items():
            self._events.write_event(Event(wall_time=now, step=int(step), summary=scalar(tag, float(value))))
        self._events.flush()

    def close(self) -> None:
        self._events.close()
