"""Runs an experiment's work items stage by stage (teachers before the students that load them), in
this process or in `jobs` spawned worker processes that share the persistent compilation cache, so
the same network compiles once for every seed."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from typing import Any, Callable, Optional, Sequence


def setup_jax(cache_dir: Optional[str]) -> None:
    """Persistent compilation cache: the same networks compile once for all seeds and workers."""
    import jax

    if cache_dir:
        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def run_stages(fn: Callable[[Any, Any], Any], stages: Sequence[Sequence[Any]], opts: Any, jobs: int,
               on_done: Callable[[Any, Any], None], cache_dir: Optional[str]) -> None:
    """Calls `fn(item, opts)` for every item, a stage only once the one before it has finished;
    `on_done(item, result)` runs in this process as each item finishes. `fn` must be a module-level
    function (workers are spawned, not forked: JAX is not fork-safe)."""
    if jobs <= 1:
        for stage in stages:
            for item in stage:
                on_done(item, fn(item, opts))
        return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=setup_jax,
                                                initargs=(cache_dir,)) as pool:
        for stage in stages:
            futures = {pool.submit(fn, item, opts): item for item in stage}
            for fut in concurrent.futures.as_completed(futures):
                on_done(futures[fut], fut.result())
