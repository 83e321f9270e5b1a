"""DevicePrefetch: the same batches, put ahead, with a state that resumes at the next returned batch."""

from __future__ import annotations

import numpy as np
import pytest

from qkd_jax.data import pipeline
from qkd_jax.data.device_prefetch import DevicePrefetch
from tests.data import IndexSource, decode_index


def _loader():
    return pipeline.make_train_loader(IndexSource(10), batch_size=4, seed=3, num_epochs=2,
                                      augment="none", num_threads=1)


def _indices(batches) -> list[list[int]]:
    return [decode_index(np.asarray(b["image"])).tolist() for b in batches]


@pytest.mark.parametrize("size", [0, 1, 2, 5])
def test_same_batches_and_exact_resume(size):
    plain = _indices(_loader())
    puts = []

    def put(batch):
        puts.append(1)
        return batch

    it = DevicePrefetch(iter(_loader()), put, size)
    head = [next(it) for _ in range(2)]
    assert len(puts) == min(2 + size, len(plain))  # `size` batches put ahead of the one returned
    state = it.get_state()
    assert state == {"next_index": 2}  # the next batch to return, not the wrapped iterator's position
    rest = list(it)
    assert _indices(head + rest) == plain
    again = DevicePrefetch(iter(_loader()), put, size)
    again.set_state(state)
    assert _indices(list(again)) == plain[2:]


def test_negative_size_is_refused():
    with pytest.raises(ValueError, match="prefetch size must be >= 0"):
        DevicePrefetch(iter(_loader()), lambda b: b, -1)
