"""TensorBoard scalars are in the event file when `add_scalars` returns (no background thread
holds them), in the TFRecord framing TensorBoard reads (length, CRC, Event proto, CRC)."""

from __future__ import annotations

import struct

import pytest
from tensorboardX.proto.event_pb2 import Event

from qkd_jax.train.tb_events import ScalarEventWriter


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32-C of `data` (crc32c via a table, independent of tensorboardX)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path) -> list[Event]:
    data, pos, events = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked_crc(header)
        body = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == _masked_crc(body)
        events.append(Event.FromString(body))
        pos += 16 + length
    return events


def test_scalars_are_on_disk_when_add_scalars_returns(tmp_path):
    writer = ScalarEventWriter(str(tmp_path / "tb"))
    writer.add_scalars({"p/train/loss": 0.5, "p/train/lr": 1e-3}, 1)
    writer.add_scalars({"p/train/loss": 0.25}, 2)
    (path,) = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    events = _records(path)  # read while the writer is still open: nothing may be pending
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    # simple_value is a float32: 1e-3 to its rounding
    assert got == [(1, "p/train/loss", 0.5), (1, "p/train/lr", pytest.approx(1e-3, rel=1e-7)),
                   (2, "p/train/loss", 0.25)]
    writer.close()
