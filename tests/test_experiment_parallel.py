"""experiments/parallel.py: every item runs once, in worker processes when jobs > 1, and no item of a
stage starts before every item of the stage before it has finished (students load their teachers)."""

from __future__ import annotations

import os
import pathlib

import pytest

from experiments import parallel


def _item(item: tuple[int, str], folder: pathlib.Path) -> dict:
    """Records which earlier-stage items had finished when this one started, then marks itself done."""
    stage, name = item
    seen = sorted(p.name for p in folder.glob(f"{stage - 1}-*.done"))
    (folder / f"{stage}-{name}.done").write_text("")
    return {"pid": os.getpid(), "seen_before": seen}


@pytest.mark.parametrize("jobs", [1, 2])
def test_stages_run_in_order_and_every_item_once(tmp_path, jobs):
    stages = [[(0, "t0"), (0, "t1"), (0, "t2")], [(1, "a"), (1, "b"), (1, "c"), (1, "d")]]
    done: dict = {}
    parallel.run_stages(_item, stages, tmp_path, jobs, done.__setitem__, None)
    assert sorted(done) == sorted(i for s in stages for i in s)
    for (stage, _), rec in done.items():
        if stage == 1:
            assert rec["seen_before"] == ["0-t0.done", "0-t1.done", "0-t2.done"]
    workers = {rec["pid"] for rec in done.values()}
    assert (workers == {os.getpid()}) if jobs == 1 else (os.getpid() not in workers)
