"""Per-process sharding of global batches (multi-host data loading).

Every global batch j of B examples covers stream positions [j*B, (j+1)*B). With P processes,
process p reads the contiguous slice [j*B + p*b, j*B + (p+1)*b), b = B / P, of every global
batch. Stacking the P local batches in process order gives exactly the global batch, which is
what `jax.make_array_from_process_local_data` assembles on a 1-D `data` mesh whose devices are
ordered by process (the order of `jax.devices()`). All processes see the same number of batches.
"""

from __future__ import annotations


def local_batch_size(global_batch_size: int, shard_count: int) -> int:
    """b = B / P; B must divide evenly over the processes."""
    if global_batch_size <= 0 or shard_count <= 0 or global_batch_size % shard_count:
        raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of "
                         f"the number of shards {shard_count}")
    return global_batch_size // shard_count


def check_shard(shard_index: int, shard_count: int) -> None:
    """0 <= shard_index < shard_count."""
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")


def global_position(local_position: int, *, local_batch: int, global_batch: int,
                    shard_index: int) -> int:
    """Stream position of this shard's `local_position`-th example."""
    j, r = divmod(local_position, local_batch)
    return j * global_batch + shard_index * local_batch + r


def process_shard() -> tuple[int, int]:
    """(jax.process_index(), jax.process_count()): this process's shard for multi-host runs."""
    import jax

    return jax.process_index(), jax.process_count()
