"""Multi-host start-up: one `jax.distributed.initialize()` per process, before any JAX computation.

Every process of a multi-host run executes the same program; this module connects them.

    from qkd_jax.train import distributed
    distributed.initialize_distributed()       # first thing in main(), before jax.devices()
    local_b = distributed.process_batch_size(config.batch_size)   # this process's share
    if distributed.is_primary(): print(...)

Where the process count, process id and coordinator come from (first match wins):
1. explicit arguments, field by field over
2. the env vars QKD_COORDINATOR ("host:port" of process 0), QKD_NUM_PROCESSES, QKD_PROCESS_ID
   (manual or localhost launches, generic clusters);
3. a managed cluster that JAX detects by itself: Cloud TPU VM (pods: every worker runs the same
   command), SLURM inside `srun` with more than one task, Open MPI (`mpirun`) with more than one
   rank; or QKD_DISTRIBUTED=1, which hands detection to JAX unconditionally.
Anything else is a single-process run and `initialize_distributed()` does nothing, so it is safe
to call unconditionally. A second call after a successful one does nothing either.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "QKD_COORDINATOR"
ENV_NUM_PROCESSES = "QKD_NUM_PROCESSES"
ENV_PROCESS_ID = "QKD_PROCESS_ID"
ENV_FORCE = "QKD_DISTRIBUTED"

# The variables JAX's own SLURM detection needs (they are set inside `srun`, not in the bare
# batch script).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"env var {name}={raw!r} is not an integer") from None


def _check_coordinator(address: str, source: str) -> str:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"{source}={address!r} is not 'host:port' (e.g. '10.0.0.1:1234' or '127.0.0.1:1234'); "
            f"it must be the address of process 0 and a free port there, the same on every process."
        )
    return address.strip()


def _running_on_cloud_tpu_vm() -> bool:
    # Set by `import jax` when libtpu and TPU chips are present (a private flag, read defensively).
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # pragma: no cover - layout of a future JAX
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster() -> str | None:
    """The multi-process environment this process runs in, or None for a single-process run.

    'manual' (QKD_COORDINATOR/QKD_NUM_PROCESSES/QKD_PROCESS_ID set), 'slurm' (inside `srun`
    with more than one task), 'ompi' (`mpirun` with more than one rank), 'tpu' (a Cloud TPU VM;
    JAX reads the pod's workers from the metadata server, one worker gives one process) or
    'forced' (QKD_DISTRIBUTED=1: let `jax.distributed.initialize()` detect it).
    """
    if any(os.environ.get(v, "").strip() for v in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)):
        return "manual"
    if all(v in os.environ for v in _SLURM_VARS) and (_env_int("SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in os.environ and (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    if _running_on_cloud_tpu_vm() or os.environ.get("TPU_WORKER_HOSTNAMES"):
        return "tpu"
    if os.environ.get(ENV_FORCE, "").strip().lower() in ("1", "true", "yes"):
        return "forced"
    return None


def _initialize(source: str, **kwargs) -> None:
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items() if v is not None) or "auto-detect"
    logger.info("jax.distributed.initialize(%s) [%s]", shown, source)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError(
                "initialize_distributed() must run before anything starts JAX's backend "
                "(jax.devices(), jax.device_put, jit, creating arrays...): call it first in main. "
                f"JAX said: {e}"
            ) from e
        raise RuntimeError(
            f"jax.distributed.initialize({shown}) failed [{source}]: {e}. Check that every process "
            f"was started with the same coordinator address and process count, a distinct process id "
            f"in [0, num_processes), that process 0 is running and its port is reachable."
        ) from e
    except ValueError as e:
        raise ValueError(
            f"jax.distributed.initialize({shown}) could not work out the cluster [{source}]: {e}. "
            f"Outside TPU VMs, SLURM (`srun`) and Open MPI, set {ENV_COORDINATOR}, "
            f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or pass them as arguments)."
        ) from e


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> None:
    """Connects this process to the others of a multi-process run; no-op for a single process.

    Call it once, first, on every process. Arguments left as None are read from
    QKD_COORDINATOR / QKD_NUM_PROCESSES / QKD_PROCESS_ID; when none of the three is given
    anywhere, a managed cluster (TPU VM pod, SLURM `srun`, Open MPI, or QKD_DISTRIBUTED=1) is
    left to JAX's auto-detection, and without one the call does nothing. `local_device_ids`
    restricts the devices this process uses (e.g. one GPU per process); it does not by itself
    make a run multi-process.

    Raises ValueError for incomplete or inconsistent settings and RuntimeError when JAX cannot
    connect or its backend was started before this call; messages name the setting at fault.
    """
    if jax.distributed.is_initialized():
        wanted = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
        if wanted is not None and wanted != jax.process_count():
            raise ValueError(
                f"JAX is already initialized with {jax.process_count()} processes, "
                f"not num_processes={wanted}"
            )
        logger.debug("initialize_distributed(): already initialized, nothing to do")
        return
    coordinator = coordinator_address
    if coordinator is None:
        coordinator = os.environ.get(ENV_COORDINATOR, "").strip() or None
    count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = {"coordinator_address": coordinator, "num_processes": count, "process_id": pid}
    if any(v is not None for v in given.values()):
        env_names = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
                     "process_id": ENV_PROCESS_ID}
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            raise ValueError(f"num_processes ({ENV_NUM_PROCESSES}) must be an int >= 1, got {count!r}")
        if count == 1 and pid in (None, 0):
            logger.info("initialize_distributed(): num_processes=1, single-process run")
            return
        missing = [f"{k} ({env_names[k]})" for k, v in given.items() if v is None]
        if missing:
            raise ValueError(
                f"a manual multi-process launch needs all of coordinator_address, num_processes and "
                f"process_id; missing {', '.join(missing)} (got "
                + ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None) + ")"
            )
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < count:
            raise ValueError(
                f"process_id ({ENV_PROCESS_ID}) must be an int in [0, {count}) for num_processes={count}, "
                f"got {pid!r}"
            )
        _initialize(
            "manual",
            coordinator_address=_check_coordinator(coordinator, f"coordinator_address ({ENV_COORDINATOR})"),
            num_processes=count,
            process_id=pid,
            local_device_ids=local_device_ids,
        )
        return
    cluster = detect_cluster()
    if cluster is None:
        logger.debug("initialize_distributed(): no multi-process environment, single-process run")
        return
    _initialize(cluster, local_device_ids=local_device_ids)


def process_batch_size(global_batch: int) -> int:
    """This process's share of a global batch: global_batch / jax.process_count().

    Raises ValueError naming both numbers when the batch does not split evenly. (The share must in
    turn split over this process's devices: `parallel.shard_batch` checks that.)
    """
    count = jax.process_count()
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise ValueError(f"global batch size must be an int >= 1, got {global_batch!r}")
    if global_batch % count:
        raise ValueError(
            f"global batch size {global_batch} does not divide over {count} processes; choose a multiple "
            f"of {count} (better: of the total device count {jax.device_count()})."
        )
    return global_batch // count


def is_primary() -> bool:
    """True on process 0: the one that prints progress and writes logs (checkpoints are collective)."""
    return jax.process_index() == 0
