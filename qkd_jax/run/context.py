"""What a run shares between its phases: the config, workdir, mesh, metrics writer, the opened
data sources, the networks (built once per run) and the results of finished phases."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import ml_collections
from etils import epath

from qkd_jax import data as qdata
from qkd_jax.run import build
from qkd_jax.train.metrics import MetricsWriter


@dataclasses.dataclass
class PhaseResult:
    """What later phases read from a finished phase."""

    name: str
    kind: str
    student: dict  # params / batch_stats / quant_delta of the phase's network
    teacher: Optional[dict]  # the co-trained teacher (train_teacher phases only)
    eval: dict
    eval_history: list = dataclasses.field(default_factory=list)  # run/report.py eval records
    warnings: list = dataclasses.field(default_factory=list)  # e.g. run/divergence.py's warning


@dataclasses.dataclass
class RunContext:
    config: ml_collections.ConfigDict
    workdir: epath.Path  # local or a bucket URI (train/paths.py)
    mesh: Any
    writer: Optional[MetricsWriter]  # set once the workdir's checkpoints passed the rerun checks
    results: dict[str, PhaseResult] = dataclasses.field(default_factory=dict)
    # Compiled eval steps by model, so evaluating every few epochs compiles once per network.
    eval_steps: dict[int, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    # Opened data sources by split, shared by the loaders and the epoch-length computation.
    sources: dict[tuple[str, bool], Any] = dataclasses.field(default_factory=dict)
    # The FP teacher and quantized student networks, built on first use, once per run.
    networks: dict[str, build.Network] = dataclasses.field(default_factory=dict)

    @property
    def info(self) -> qdata.DatasetInfo:
        return qdata.dataset_info(self.config.dataset.name)

    @property
    def data_dir(self) -> Optional[str]:
        return self.config.dataset.data_dir or None

    def source(self, split: str, encoded: bool = False):
        """The dataset's random-access source for `split`, opened once per run (`encoded`:
        records hold the JPEG bytes, see `qkd_jax.data.get_source`)."""
        key = (split, encoded)
        if key not in self.sources:
            self.sources[key] = qdata.get_source(self.config.dataset.name, split, self.data_dir,
                                                 encoded=encoded)
        return self.sources[key]

    def network(self, kind: str) -> build.Network:
        """The FP network for kind 'teacher', the quantized student otherwise (built once)."""
        key = "teacher" if kind == "teacher" else "student"
        if key not in self.networks:
            self.networks[key] = (build.teacher_network(self.config) if key == "teacher"
                                  else build.student_network(self.config))
        return self.networks[key]


def console(msg: str) -> None:
    """A progress line on process 0's console."""
    if jax.process_index() == 0:
        print(msg, flush=True)
