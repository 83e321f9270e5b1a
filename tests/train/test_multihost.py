"""Multi-host support: `initialize_distributed` settings, batch split, and a real two-process run.

The two-process test starts `tests/train/multihost_worker.py` twice on localhost (CPU, 2 devices
per process, gloo collectives over loopback, coordinator on 127.0.0.1), each feeding its half of
the global batch; their trained params must equal one device stepping on the whole batch.
"""

import functools
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.train import distributed
from qkd_jax.train.step import train_step
from tests.train import multihost_worker as worker

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT_S = 120
_CLUSTER_ENV = (
    "QKD_COORDINATOR", "QKD_NUM_PROCESSES", "QKD_PROCESS_ID", "QKD_DISTRIBUTED", "TPU_WORKER_HOSTNAMES",
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in _CLUSTER_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_running_on_cloud_tpu_vm", lambda: False)
    return monkeypatch


def test_single_process_is_a_no_op(clean_env):
    assert distributed.detect_cluster() is None
    distributed.initialize_distributed()
    clean_env.setenv("QKD_NUM_PROCESSES", "1")
    distributed.initialize_distributed()
    distributed.initialize_distributed(num_processes=1, process_id=0)
    assert not jax.distributed.is_initialized()
    assert distributed.is_primary() and jax.process_count() == 1


@pytest.mark.parametrize(
    "env, kwargs, match",
    [
        ({"QKD_NUM_PROCESSES": "2"}, {}, r"missing coordinator_address \(QKD_COORDINATOR\), process_id \(QKD_PROCESS_ID\)"),
        ({"QKD_COORDINATOR": "127.0.0.1:1234", "QKD_PROCESS_ID": "0"}, {}, r"missing num_processes \(QKD_NUM_PROCESSES\)"),
        ({"QKD_NUM_PROCESSES": "two"}, {}, r"QKD_NUM_PROCESSES='two' is not an integer"),
        ({}, dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), r"in \[0, 2\).*got 2"),
        ({}, dict(coordinator_address="127.0.0.1:1234", num_processes=0, process_id=0), r"int >= 1, got 0"),
        ({}, dict(coordinator_address="localhost", num_processes=2, process_id=1), r"'localhost' is not 'host:port'"),
    ],
)
def test_incomplete_or_wrong_settings_raise_naming_them(clean_env, env, kwargs, match):
    for key, value in env.items():
        clean_env.setenv(key, value)
    with pytest.raises(ValueError, match=match):
        distributed.initialize_distributed(**kwargs)
    assert not jax.distributed.is_initialized()


def test_arguments_override_env_and_late_call_is_explained(clean_env):
    clean_env.setenv("QKD_NUM_PROCESSES", "1")  # would be a no-op; the arguments say 2 processes
    jax.devices()  # the backend is running: JAX refuses before contacting any coordinator
    with pytest.raises(RuntimeError, match="must run before anything starts JAX's backend"):
        distributed.initialize_distributed("127.0.0.1:1", num_processes=2, process_id=1)


def test_detect_cluster(clean_env):
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    for key, value in slurm.items():
        clean_env.setenv(key, value)
    assert distributed.detect_cluster() == "slurm"
    clean_env.setenv("SLURM_NTASKS", "1")  # one task: a single-process run
    assert distributed.detect_cluster() is None
    clean_env.setenv("QKD_DISTRIBUTED", "1")
    assert distributed.detect_cluster() == "forced"
    clean_env.setenv("QKD_PROCESS_ID", "0")
    assert distributed.detect_cluster() == "manual"


def test_process_batch_size(monkeypatch):
    assert distributed.process_batch_size(16) == 16 // jax.process_count()
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    assert distributed.process_batch_size(32) == 8
    with pytest.raises(ValueError, match="global batch size 30 does not divide over 4 processes"):
        distributed.process_batch_size(30)
    with pytest.raises(ValueError, match="int >= 1"):
        distributed.process_batch_size(0)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_env(port: int, process_id: int) -> dict:
    env = {k: v for k, v in os.environ.items() if "_proxy" not in k.lower() and k not in _CLUSTER_ENV}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        QKD_COORDINATOR=f"127.0.0.1:{port}",
        QKD_NUM_PROCESSES="2",
        QKD_PROCESS_ID=str(process_id),
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",  # loopback only (default: all interfaces)
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def _run_workers(tmp_path: pathlib.Path) -> list[dict]:
    port = _free_loopback_port()
    procs, logs = [], []
    for i in range(2):
        log = open(tmp_path / f"worker{i}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.train.multihost_worker", str(tmp_path / f"out{i}.npz")],
            cwd=ROOT, env=_worker_env(port, i), stdout=log, stderr=subprocess.STDOUT,
        ))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        tails = "\n".join(f"--- worker {i} (exit {c}):\n" + (tmp_path / f"worker{i}.log").read_text()[-3000:]
                          for i, c in enumerate(codes))
        pytest.fail(f"worker processes failed or timed out after {TIMEOUT_S} s:\n{tails}")
    return [dict(np.load(tmp_path / f"out{i}.npz")) for i in range(2)]


@pytest.mark.slow
def test_two_processes_match_one_device_on_the_global_batch(tmp_path):
    results = _run_workers(tmp_path)

    # Reference: one device, the whole global batch, same toy state (no BatchNorm) and SGD.
    state = worker.make_state(None)
    step = jax.jit(functools.partial(train_step, objective=worker.objective(), axis_name=None))
    expected = {}
    for i in range(worker.NUM_STEPS):
        state, metrics = step(state, jax.tree.map(jnp.asarray, worker.global_batch(i)))
        expected.update(worker.flat_arrays(metrics, f"metrics/{i}/"))
    expected.update(worker.flat_arrays(state.params, "params/"))
    expected.update(worker.flat_arrays(state.opt_state, "opt_state/"))

    for pid, got in enumerate(results):
        np.testing.assert_array_equal(got.pop("process"), [pid, 2, 4])
        assert int(got.pop("step")) == worker.NUM_STEPS
        assert sorted(got) == sorted(expected)
        for key, want in expected.items():
            np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6, err_msg=f"process {pid}: {key}")
    for key in expected:  # both processes hold the same replicated state
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
    # The run actually trained: params moved away from the initial ones.
    init = worker.flat_arrays(worker.make_state(None).params, "params/")
    assert max(float(np.max(np.abs(results[0][k] - v))) for k, v in init.items()) > 1e-3
