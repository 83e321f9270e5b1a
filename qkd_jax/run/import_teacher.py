"""A torchvision weights file turned into a finished 'teacher' phase, for `--config.teacher_checkpoint`.

The papers start their students from a pretrained FP model. `import_teacher` writes, into its own
directory, the checkpoint the runner's teacher phase would leave after training: the TrainState
of the config's teacher phase (same structure, optimizer state freshly initialised, step 0) with
the imported params and batch_stats, and metadata with `completed=True`, the config and the
phase's settings record (`run/record.py`), so a run with `--config.teacher_checkpoint=OUT` reads
it back as "already completed" and checks it on dataset, model, class count and image size
(`run/rerun.py`). When the config's dataset is prepared, the teacher is evaluated on its eval
split and the result stored as the phase's eval; otherwise the eval is left empty.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from etils import epath

from qkd_jax import data as qdata
from qkd_jax.models import import_torchvision, list_models, load_weights, torchvision_num_classes
from qkd_jax.models.torchvision_names import supported_models
from qkd_jax.run import build, recipes
from qkd_jax.run.config_files import load_config
from qkd_jax.run.config_schema import ConfigError
from qkd_jax.run.context import RunContext, console
from qkd_jax.run.evaluate import evaluate
from qkd_jax.run.loop import validate_config
from qkd_jax.run.plan import PhasePlan, make_plan
from qkd_jax.run.states import build_state, checkpoint_meta
from qkd_jax.train import parallel
from qkd_jax.train.checkpoint import PhaseCheckpointer
from qkd_jax.train.paths import as_path


class ImportTeacherError(ValueError):
    """The weights, model, config or output directory cannot make a teacher phase (the message says why)."""


def default_config(model: str) -> ml_collections.ConfigDict:
    """The ImageNet FP-teacher config of `model` (its teacher phase is that of every ImageNet config)."""
    return recipes.imagenet_config(recipes.imagenet_variant("fp", ()), model=model)


def _resolve_config(config: ml_collections.ConfigDict | str | None, model: str,
                    num_classes: Optional[int]) -> ml_collections.ConfigDict:
    if isinstance(config, str):
        config = load_config(config)
    config = default_config(model) if config is None else config.copy_and_resolve_references()
    if config.model.name != model:
        raise ImportTeacherError(f"--model={model} but the config's model is {config.model.name!r}: "
                                 f"name the same model in both")
    if num_classes is not None:
        config.model.num_classes = int(num_classes)
    config.teacher_checkpoint = ""  # the phase is written here, not read from elsewhere
    try:
        validate_config(config)
    except ConfigError as err:
        raise ImportTeacherError(f"invalid config: {err}") from err
    return config


def _teacher_plan(config: ml_collections.ConfigDict, out_dir: epath.Path) -> PhasePlan:
    names = [n for n in config.phase_order.split(",") if config.phases[n].kind == "teacher"]
    if len(names) != 1:
        raise ImportTeacherError(f"the config has {len(names)} 'teacher' phases in phase_order "
                                 f"{config.phase_order!r}; it needs exactly one to import into")
    # Schedules do not change the optimizer state's structure: one step per epoch builds it.
    plan = make_plan(config, out_dir.parent, names[0], steps_per_epoch=1)
    return dataclasses.replace(plan, directory=out_dir)


def _read_weights(weights_path: epath.Path, model: str, expected_classes: int) -> dict:
    if not weights_path.is_file():
        raise ImportTeacherError(f"no weights file {weights_path}: give the path of a torchvision "
                                 f"state_dict saved as .pth, .safetensors or .npz")
    try:
        state_dict = load_weights(weights_path)
    except ImportError as err:  # a .pth without torch
        raise ImportTeacherError(str(err)) from err
    except Exception as err:  # noqa: BLE001  (numpy, zipfile, safetensors, torch: many types for a damaged file)
        raise ImportTeacherError(f"cannot read {weights_path} ({type(err).__name__}: {err}): give an intact "
                                 f"torchvision state_dict saved as .pth, .safetensors or .npz") from None
    if not state_dict:
        raise ImportTeacherError(f"{weights_path} holds no arrays: give a torchvision state_dict saved as "
                                 f".pth, .safetensors or .npz")
    try:
        classes = torchvision_num_classes(model, state_dict)
    except (ValueError, KeyError) as err:
        raise ImportTeacherError(f"cannot read {weights_path} as {model!r} weights: {err}") from err
    if classes != expected_classes:
        raise ImportTeacherError(
            f"{weights_path} has a {classes}-class classifier but the config expects {expected_classes} "
            f"classes: use weights trained for {expected_classes} classes, or set num_classes={classes} "
            f"(--num_classes / --config.model.num_classes={classes}) here and in the runs that use it")
    try:
        return import_torchvision(model, state_dict)
    except ValueError as err:
        raise ImportTeacherError(str(err)) from err


def _merge(initial: dict, imported: dict) -> dict:
    """`initial` with its params and batch_stats replaced by the imported ones (same tree and shapes)."""
    for collection in ("params", "batch_stats"):
        want = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), initial.get(collection, {}))
        got = jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), imported.get(collection, {}))
        if want != got:
            raise ImportTeacherError(f"the imported {collection} do not match the teacher network of "
                                     f"the config (different layers or shapes)")
    return {**initial, "params": imported["params"], "batch_stats": imported.get("batch_stats", {})}


def _check_out_dir(out_dir: epath.Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ImportTeacherError(f"--out={out_dir} is a file; name a new directory")
    if out_dir.is_dir() and any(p.name.isdigit() for p in out_dir.iterdir()):
        raise ImportTeacherError(f"--out={out_dir} already holds a checkpoint; name a new directory "
                                 f"(or delete that one)")


def _evaluate(ctx: RunContext, net: build.Network, variables: dict) -> dict:
    """Top-1/top-5/loss on the config's eval split, or {} when the dataset is not prepared."""
    config = ctx.config
    try:
        ctx.source(qdata.dataset_info(config.dataset.name).eval_split)
    except qdata.DatasetNotPreparedError:
        console(f"[import_teacher] dataset {config.dataset.name!r} not prepared: not evaluated")
        return {}
    return evaluate(ctx, net.train_model, variables)


def import_teacher(weights_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, model: str,
                   num_classes: Optional[int] = None,
                   config: ml_collections.ConfigDict | str | None = None,
                   evaluate_teacher: bool = True) -> epath.Path:
    """Writes a completed teacher phase of `config` (a ConfigDict, a `PATH[:ARG]` config file, or
    None for the ImageNet FP recipe of `model`) holding the torchvision weights of `weights_path`
    into `out_dir`; returns `out_dir`. Raises ImportTeacherError naming the problem and its fix."""
    # The weights file is read locally (torch / safetensors / numpy open it); `out_dir` may be a bucket URI.
    weights_path, out_dir = as_path(weights_path), as_path(out_dir)
    if model not in list_models() or model not in supported_models():
        raise ImportTeacherError(f"unknown model {model!r} for a torchvision import; supported: "
                                 f"{', '.join(supported_models())}")
    _check_out_dir(out_dir)
    config = _resolve_config(config, model, num_classes)
    plan = _teacher_plan(config, out_dir)
    imported = _read_weights(weights_path, model, build.num_classes(config))
    ctx = RunContext(config=config, workdir=out_dir.parent, mesh=parallel.make_mesh(), writer=None)
    net = ctx.network("teacher")
    variables = _merge(build.init_variables(net.local_model, config, jax.random.key(plan.seed)), imported)
    state = build_state(ctx, plan, variables, net)
    eval_metrics = _evaluate(ctx, net, variables) if evaluate_teacher else {}
    meta = checkpoint_meta(ctx, plan, completed=True, eval_metrics=eval_metrics)
    meta["imported_from"] = str(weights_path)
    ckpt = PhaseCheckpointer(out_dir)
    try:
        ckpt.save(state, meta=meta)
    finally:
        ckpt.close()
    top1 = f", eval top1 {eval_metrics['top1']:.2f}%" if eval_metrics else ""
    console(f"[import_teacher] {model} ({build.num_classes(config)} classes, "
            f"{int(sum(np.size(x) for x in jax.tree.leaves(variables['params'])))} parameters) from "
            f"{weights_path} -> completed '{plan.name}' phase in {out_dir}{top1}")
    return out_dir
