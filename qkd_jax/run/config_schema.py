"""The experiment config: its defaults, and validation that runs before any work starts.

Config files under `configs/` start from `base_config()` and add phases with `phase()`.
`validate(config)` rejects unknown keys (naming them and the known ones) and impossible values
(naming the key), so a typo on the command line fails in a second instead of after an hour.

A run is an ordered list of phases (`phase_order`), each a ConfigDict in `phases`:
  kind        'teacher'   train the full-precision model (cross-entropy), or load it from
                          `teacher_checkpoint`;
              'calibrate' copy the teacher into the quantized student and initialise every
                          quantizer parameter from one batch (no training);
              'student'   train the quantized student with `objective`.
              'paraphraser' Factor Transfer's paraphraser trained on the frozen teacher's
                          feats[-2] (MSE reconstruction; `teacher_from`, `weights`, `epochs`).
  aux_from    the 'paraphraser' phase whose trained paraphraser a feature='factor' phase uses.
  init_from   the phase whose final student variables start this phase.
  teacher_from the phase whose network is the teacher: a 'teacher' phase, or a 'student' phase
              with train_teacher=True (QKD tutoring uses the co-studied teacher).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Iterable

import ml_collections

from qkd_jax.distill import OBJECTIVES, get_objective
from qkd_jax.distill.feature_kd import FEATURE_METHODS, get_feature
from qkd_jax.quant.released_methods import RELEASED_METHODS
from qkd_jax.train.optim import GroupSpec

#: config.compute_dtype values: the dtype of activations, convolutions and matmuls; parameters,
#: optimizer state, BatchNorm statistics, quantizers and losses stay float32 (docs/method.md,
#: "Mixed precision").
COMPUTE_DTYPES = ("float32", "bfloat16")
#: quant.variant values: the library's quantizers or the released SQAKD Tiny-ImageNet ones.
QUANT_VARIANTS = ("textbook", "released")

PHASE_KINDS = ("teacher", "calibrate", "student", "paraphraser")
#: The EWGS estimators of the legacy path (quant_delta); every registered estimator is accepted too
#: (run/estimator_config.py).
ESTIMATORS = ("ste", "ewgs", "hessian")
# How quant.estimator='hessian' takes its traces (docs/method.md section 5): each layer probed on its
# own (released EWGS code) or one joint probe; the cross-entropy with labels (released) or the phase's loss.
HESSIAN_PROBES = ("per_layer", "joint")
HESSIAN_LOSSES = ("ce", "phase")
# config.teacher_select: which epoch of the run's FP teacher the later phases read (run/teacher_select.py).
TEACHER_SELECT = ("last", "best")


def optimizer_config(**overrides: Any) -> ml_collections.ConfigDict:
    """A GroupSpec as a ConfigDict. clip_norm 0 means no clipping; decay '' the optimizer's default."""
    base = dict(
        optimizer="adam",
        learning_rate=1e-3,
        schedule="cosine_epoch",
        momentum=0.0,
        nesterov=False,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        decay="",
        warmup_steps=0,
        warmup_init_lr=0.0,
        decay_epochs=(),
        decay_factor=0.1,
        clip_norm=0.0,
    )
    unknown = set(overrides) - set(base)
    if unknown:
        raise ValueError(f"unknown optimizer key(s) {sorted(unknown)}; known: {sorted(base)}")
    base.update(overrides)
    return ml_collections.ConfigDict(base)


def group_spec(cfg: ml_collections.ConfigDict) -> GroupSpec:
    """GroupSpec from an optimizer ConfigDict (maps the config's '' and 0 sentinels to None)."""
    values = dict(cfg)
    values["decay"] = values["decay"] or None
    values["clip_norm"] = values["clip_norm"] or None
    values["decay_epochs"] = tuple(values["decay_epochs"])
    return GroupSpec.from_mapping(values)


def phase(kind: str = "student", **overrides: Any) -> ml_collections.ConfigDict:
    """One phase's ConfigDict with every key present (defaults shown here).

    Every override is deep-copied: a config that hands the same optimizer ConfigDict to two
    phases still gives each phase its own, so `--config.phases.A.weights.learning_rate=...`
    changes phase A only (and an error names the phase that holds the value)."""
    base = dict(
        kind=kind,
        objective="task",
        alpha=1.0,
        gamma=1.0,
        temperature=4.0,
        label_smoothing=0.0,
        # Feature distillation (objective 'kd' only): beta * the criterion's loss; `feature` names a
        # criterion of qkd_jax.distill.FEATURE_METHODS ('' = none), `feature_options` its options.
        beta=0.0,
        feature="",
        feature_options=ml_collections.ConfigDict(),
        aux_from="",  # feature='factor': the 'paraphraser' phase whose paraphraser it freezes
        # Comma-separated top-level parameter subtrees that get no update, weight decay included
        # (FSP's initialisation phase: 'classifier').
        freeze="",
        init_from="",
        teacher_from="",
        train_teacher=False,
        epochs=1,
        batch_size=64,
        eval_every_epochs=1,
        weights=optimizer_config(),
        quant_params=optimizer_config(learning_rate=1e-5),
        teacher_opt=optimizer_config(),
    )
    for key, value in overrides.items():
        if key not in base:
            raise ValueError(f"unknown phase key {key!r}; known: {sorted(base)}")
        base[key] = copy.deepcopy(value)
    return ml_collections.ConfigDict(base)


def base_config() -> ml_collections.ConfigDict:
    """Every top-level key with its default; experiment files override what they need."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = ml_collections.ConfigDict(
        dict(name="qkd_digits", data_dir="", augment="", image_size=0, eval_batch_size=256)
    )
    # Input pipeline. num_workers: grain worker processes decoding and augmenting (0 = threads
    # in the training process); prefetch: batches put on the device ahead of the step (0 =
    # none); jpeg: for datasets stored as JPEG (imagenet2012), decode each training/eval image
    # at the smallest DCT scale its crop needs, emit uint8 and normalise on the device
    # (qkd_jax/data/jpeg_augment.py, device_normalize.py; the ImageNet recipes turn it on).
    c.data = ml_collections.ConfigDict(dict(num_workers=0, prefetch=2, jpeg=False))
    c.model = ml_collections.ConfigDict(dict(name="resnet20", num_classes=0))
    c.quant = ml_collections.ConfigDict(
        dict(
            method="interval",
            w_bits=2,
            a_bits=2,
            preset="sqakd_cifar",
            # A registered gradient estimator (qkd_jax/quant/estimators.py) or 'hessian' (EWGS with the
            # Hessian-trace delta); estimator_options: 'key=value,...' (run/estimator_config.py).
            estimator="ste",
            estimator_options="",
            # Estimator diagnostics logged every N steps of student phases (0 = off; run/diagnostics_log.py).
            diagnostics_every_steps=0,
            diagnostics_estimators="ste",
            delta=0.0,
            hessian_every_epochs=10,
            hessian_batches=3,
            hessian_batch_size=256,
            hessian_max_probes=50,
            hessian_probe="per_layer",
            hessian_loss="ce",
            pact_alpha=0.0,
            # 'textbook': the records of qkd_jax/quant/methods.py (docs/method.md section 2);
            # 'released': 'pact' / 'lsq' / 'dorefa' become the released SQAKD Tiny-ImageNet
            # (MQBench) records, calibrated on full-precision inputs, their quantizer parameters
            # under the quant_params group's weight decay (section 9).
            variant="textbook",
        )
    )
    # 'bfloat16': mixed precision on GPU/TPU (bfloat16 activations and convolutions, float32
    # parameters, optimizer state, BatchNorm statistics, quantizers and losses).
    c.compute_dtype = "float32"
    c.teacher_checkpoint = ""
    # Which of the teacher phase's epochs later phases read: 'last' (the final epoch) or 'best'
    # (the evaluated epoch of highest top-1 on the eval split, as the released scripts' best
    # checkpoint; selected on the test data, docs/method.md "Teacher selection"). Per run, not per
    # phase: every phase of a run reads the same teacher.
    c.teacher_select = "last"
    # Rerun in a workdir with changed settings: delete this phase's checkpoints and every later
    # phase's, and train them again ("" = refuse changed settings; see run/rerun.py).
    c.retrain_from = ""
    c.phase_order = "teacher"
    c.phases = ml_collections.ConfigDict({"teacher": phase("teacher", weights=optimizer_config())})
    c.log_every_steps = 50
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 2
    c.tensorboard = True
    return c


class ConfigError(ValueError):
    """A config key is unknown or has an impossible value."""


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config.{key}={value!r} is invalid: {why}")


def _check_keys(cfg: Any, template: Any, prefix: str) -> None:
    known, given = set(template.keys()), set(cfg.keys())
    for key in sorted(given - known):
        raise ConfigError(
            f"unknown config key '{prefix}{key}'; known keys at this level: {sorted(known)}"
        )
    for key in sorted(known - given):
        raise ConfigError(f"config key '{prefix}{key}' is missing (start configs from base_config())")
    for key in known:
        sub_t = template[key]
        # phases and feature_options hold free-form keys, checked by _validate_phases.
        if isinstance(sub_t, ml_collections.ConfigDict) and key not in ("phases", "feature_options"):
            if not isinstance(cfg[key], (ml_collections.ConfigDict, dict)):
                _fail(prefix + key, cfg[key], "must be a ConfigDict")
            _check_keys(cfg[key], sub_t, f"{prefix}{key}.")


def phase_names(config: ml_collections.ConfigDict) -> list[str]:
    return [p.strip() for p in config.phase_order.split(",") if p.strip()]


FEATURE_KEYS = ("beta", "feature")


def objective_kwargs(name: str, ph: ml_collections.ConfigDict) -> dict:
    """The phase's objective arguments that the named objective accepts (the criterion by name).

    `beta` and `feature` appear only when a feature term is asked for, so phases without one
    keep the record they had before these keys existed."""
    params = inspect.signature(OBJECTIVES[name]).parameters
    out = {k: ph[k] for k in ("alpha", "gamma", "temperature", "label_smoothing") if k in params}
    if ph.beta or ph.feature:
        out.update({k: ph[k] for k in FEATURE_KEYS if k in params})
    return out


def feature_options(ph: ml_collections.ConfigDict) -> dict:
    """The phase's `feature_options` as a plain dict (lists for sequences)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in ph.feature_options.items()}


def takes_step_beta(name: str) -> bool:
    """Whether criterion ``name`` has a ``beta`` option: the phase's beta, which the runner passes
    (CKTF weighs its two terms as beta * L_crd + theta * L_st although the step multiplies by beta)."""
    return "beta" in inspect.signature(FEATURE_METHODS[name]).parameters


def build_objective(ph: ml_collections.ConfigDict):
    kwargs = objective_kwargs(ph.objective, ph)
    if kwargs.get("feature"):
        options = feature_options(ph)
        if takes_step_beta(ph.feature):
            options["beta"] = ph.beta
        kwargs["feature"] = get_feature(ph.feature, **options)
    return get_objective(ph.objective, **kwargs)


def _validate_aux_from(key: str, ph: ml_collections.ConfigDict, seen: dict) -> None:
    """feature='factor' needs aux_from naming an earlier 'paraphraser' phase; nothing else takes it."""
    if ph.feature == "factor" and ph.kind == "student":
        if not ph.aux_from or ph.aux_from not in seen or seen[ph.aux_from].kind != "paraphraser":
            _fail(f"{key}.aux_from", ph.aux_from, "feature='factor' needs aux_from naming an earlier "
                  "'paraphraser' phase (its trained paraphraser)")
        if seen[ph.aux_from].teacher_from != ph.teacher_from:
            _fail(f"{key}.aux_from", ph.aux_from, f"the paraphraser was trained on teacher "
                  f"{seen[ph.aux_from].teacher_from!r}, this phase distils from {ph.teacher_from!r}")
    elif ph.aux_from:
        _fail(f"{key}.aux_from", ph.aux_from, "only a student phase with feature='factor' takes it")


def _validate_feature(key: str, ph: ml_collections.ConfigDict) -> None:
    """beta / feature / feature_options: a named criterion, its options, a non-zero beta."""
    accepts = "feature" in inspect.signature(OBJECTIVES[ph.objective]).parameters
    if not isinstance(ph.feature, str):
        _fail(f"{key}.feature", ph.feature, "must be a criterion name string ('' = none)")
    if not isinstance(ph.feature_options, (ml_collections.ConfigDict, dict)):
        _fail(f"{key}.feature_options", ph.feature_options, "must be a dict of the criterion's options")
    if ph.feature and not accepts:
        _fail(f"{key}.feature", ph.feature, f"objective {ph.objective!r} takes no feature term; use objective='kd'")
    if ph.feature and ph.feature not in FEATURE_METHODS:
        _fail(f"{key}.feature", ph.feature, f"unknown feature criterion; known: {sorted(FEATURE_METHODS)}")
    if ph.feature and not ph.beta:
        _fail(f"{key}.beta", ph.beta, f"feature={ph.feature!r} needs a non-zero beta (its loss weight)")
    if ph.beta and not ph.feature:
        _fail(f"{key}.beta", ph.beta, "weighs a feature loss but feature is '' (name a criterion or set beta=0)")
    if len(ph.feature_options) and not ph.feature:
        _fail(f"{key}.feature_options", dict(ph.feature_options), "given without a feature criterion")
    if ph.feature and "beta" in ph.feature_options:
        _fail(f"{key}.feature_options.beta", ph.feature_options.beta, f"set the phase's beta instead (the "
              f"runner passes it to {ph.feature!r})")


def _int_in(key: str, value: Any, lo: int, hi: float = float("inf")) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        _fail(key, value, f"must be an integer in [{lo}, {hi}]")


def validate(config: ml_collections.ConfigDict, *, known_models: Iterable[str] = (),
             known_datasets: Iterable[str] = (), known_methods: Iterable[str] = (),
             known_presets: Iterable[str] = ()) -> None:
    """Raises ConfigError naming the first unknown key or impossible value."""
    _check_keys(config, base_config(), "")
    known_models, known_datasets = list(known_models), list(known_datasets)
    known_methods, known_presets = list(known_methods), list(known_presets)
    if known_models and config.model.name not in known_models:
        _fail("model.name", config.model.name, f"unknown model; known: {known_models}")
    if known_datasets and config.dataset.name not in known_datasets:
        _fail("dataset.name", config.dataset.name, f"unknown dataset; known: {known_datasets}")
    if config.compute_dtype not in COMPUTE_DTYPES:
        _fail("compute_dtype", config.compute_dtype, f"must be one of {COMPUTE_DTYPES} "
              "('bfloat16' for mixed precision on GPU/TPU)")
    _int_in("model.num_classes", config.model.num_classes, 0)
    _int_in("dataset.image_size", config.dataset.image_size, 0)
    _int_in("dataset.eval_batch_size", config.dataset.eval_batch_size, 1)
    _int_in("data.num_workers", config.data.num_workers, 0)
    _int_in("data.prefetch", config.data.prefetch, 0)
    if not isinstance(config.data.jpeg, bool):
        _fail("data.jpeg", config.data.jpeg, "must be True or False")
    q = config.quant
    if known_methods and q.method not in known_methods:
        _fail("quant.method", q.method, f"unknown quantizer method; known: {known_methods}")
    if known_presets and q.preset not in known_presets:
        _fail("quant.preset", q.preset, f"unknown precision preset; known: {known_presets}")
    _int_in("quant.w_bits", q.w_bits, 1, 8)
    _int_in("quant.a_bits", q.a_bits, 1, 8)
    _validate_estimator(q)
    if not q.delta >= 0:
        _fail("quant.delta", q.delta, "EWGS delta must be >= 0 (0 = straight-through)")
    _int_in("quant.hessian_every_epochs", q.hessian_every_epochs, 1)
    _int_in("quant.hessian_batches", q.hessian_batches, 1)
    _int_in("quant.hessian_batch_size", q.hessian_batch_size, 1)
    _int_in("quant.hessian_max_probes", q.hessian_max_probes, 1)
    if q.hessian_probe not in HESSIAN_PROBES:
        _fail("quant.hessian_probe", q.hessian_probe, f"must be one of {HESSIAN_PROBES}")
    if q.hessian_loss not in HESSIAN_LOSSES:
        _fail("quant.hessian_loss", q.hessian_loss, f"must be one of {HESSIAN_LOSSES} ('ce' reads labels)")
    if q.pact_alpha < 0:
        _fail("quant.pact_alpha", q.pact_alpha, "must be >= 0 (0 = from data)")
    _validate_variant(q)
    _int_in("log_every_steps", config.log_every_steps, 1)
    _int_in("checkpoint_every_steps", config.checkpoint_every_steps, 1)
    _int_in("keep_checkpoints", config.keep_checkpoints, 1)
    if config.teacher_select not in TEACHER_SELECT:
        _fail("teacher_select", config.teacher_select, f"must be one of {TEACHER_SELECT}")
    _validate_phases(config)


def _validate_estimator(q: ml_collections.ConfigDict) -> None:
    """quant.estimator names a registered estimator (or 'hessian'); its options parse and are valid."""
    from qkd_jax.run.estimator_config import config_estimator, known_estimators

    if q.estimator not in known_estimators():
        _fail("quant.estimator", q.estimator, f"unknown gradient estimator; registered: {known_estimators()}")
    if not isinstance(q.estimator_options, str):
        _fail("quant.estimator_options", q.estimator_options, "must be a string 'key=value,...'")
    try:
        config_estimator(q)
    except (ValueError, TypeError) as err:
        _fail("quant.estimator_options", q.estimator_options, str(err))
    from qkd_jax.run.diagnostics_log import diagnostics_names

    _int_in("quant.diagnostics_every_steps", q.diagnostics_every_steps, 0)
    try:
        diagnostics_names(q.diagnostics_estimators)
    except ValueError as err:
        _fail("quant.diagnostics_estimators", q.diagnostics_estimators, str(err))


def _validate_variant(q: ml_collections.ConfigDict) -> None:
    """quant.variant against quant.method, the bits, pact_alpha and the preset."""
    if q.variant not in QUANT_VARIANTS:
        _fail("quant.variant", q.variant, f"must be one of {QUANT_VARIANTS}")
    if q.variant == "released":
        if q.method not in RELEASED_METHODS:
            _fail("quant.variant", q.variant, f"the released (MQBench) quantizers exist for methods "
                  f"{sorted(RELEASED_METHODS)}, not quant.method={q.method!r}; use quant.variant='textbook'")
        if min(q.w_bits, q.a_bits) < 2:
            _fail("quant.variant", q.variant, f"the released quantizers take 2..8 bits (W{q.w_bits}A{q.a_bits}); "
                  f"use quant.variant='textbook' below 2 bits")
        if q.pact_alpha:
            _fail("quant.pact_alpha", q.pact_alpha, "the released PACT alpha is the constant 6; set "
                  "quant.pact_alpha=0 or quant.variant='textbook'")
    elif q.preset == "mqbench_academic":
        _fail("quant.preset", q.preset, "preset 'mqbench_academic' needs quant.variant='released'; with "
              "quant.variant='textbook' choose a textbook preset, e.g. quant.preset='first_last_8bit'")


def _validate_hessian_loss(q: ml_collections.ConfigDict, name: str, ph: ml_collections.ConfigDict,
                           objective: Any) -> None:
    """quant.hessian_loss='phase' probes the objective's logit terms only (the probe records no
    features): a student phase with a feature term alone (FSP's init phase) would probe a zero loss."""
    if (ph.kind == "student" and q.estimator == "hessian" and q.hessian_loss == "phase"
            and not getattr(objective, "terms", True)):
        _fail("quant.hessian_loss", q.hessian_loss,
              f"phase {name!r} has no logit term (gamma = alpha = 0; its feature term {ph.feature!r} is not "
              f"probed), so its EWGS delta would stay 0; use quant.hessian_loss='ce' or quant.estimator='ste'")


def _validate_phases(config: ml_collections.ConfigDict) -> None:
    order = phase_names(config)
    if not order:
        _fail("phase_order", config.phase_order, "names no phase")
    if len(set(order)) != len(order):
        _fail("phase_order", config.phase_order, "names a phase twice")
    if config.retrain_from and config.retrain_from not in order:
        _fail("retrain_from", config.retrain_from, f"must name a phase of phase_order ({order}) or be ''")
    defined = set(config.phases.keys())
    for name in order:
        if name not in defined:
            _fail("phase_order", config.phase_order, f"phase {name!r} is not defined in config.phases ({sorted(defined)})")
    # Phases defined but not listed are not run (e.g. --config.phase_order=teacher,calibrate).
    template = phase()
    seen: dict[str, ml_collections.ConfigDict] = {}
    for name in order:
        ph = config.phases[name]
        _check_keys(ph, template, f"phases.{name}.")
        key = f"phases.{name}"
        if ph.kind not in PHASE_KINDS:
            _fail(f"{key}.kind", ph.kind, f"must be one of {PHASE_KINDS}")
        if ph.objective not in OBJECTIVES:
            _fail(f"{key}.objective", ph.objective, f"unknown objective; known: {sorted(OBJECTIVES)}")
        _int_in(f"{key}.epochs", ph.epochs, 0)
        _int_in(f"{key}.batch_size", ph.batch_size, 1)
        _int_in(f"{key}.eval_every_epochs", ph.eval_every_epochs, 1)
        for opt_key in ("weights", "quant_params", "teacher_opt"):
            try:
                group_spec(ph[opt_key])
            except ValueError as err:
                raise ConfigError(f"config.{key}.{opt_key}: {err}") from None
        _validate_feature(key, ph)
        if not isinstance(ph.freeze, str) or (ph.freeze and ph.kind != "student"):
            _fail(f"{key}.freeze", ph.freeze, "must be a comma-separated string of top-level parameter names "
                  "('' = none), on a student phase only")
        try:
            objective = build_objective(ph)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"config.{key}: objective {ph.objective!r}: {err}") from None
        _validate_hessian_loss(config.quant, name, ph, objective)
        if ph.init_from and ph.init_from not in seen:
            _fail(f"{key}.init_from", ph.init_from, f"must name an earlier phase ({sorted(seen)})")
        if ph.teacher_from:
            src = seen.get(ph.teacher_from)
            if src is None:
                _fail(f"{key}.teacher_from", ph.teacher_from, f"must name an earlier phase ({sorted(seen)})")
            if src.kind != "teacher" and not src.train_teacher:
                _fail(f"{key}.teacher_from", ph.teacher_from,
                      "must name a 'teacher' phase or a student phase with train_teacher=True")
        if ph.kind == "teacher":
            if ph.init_from or ph.teacher_from or ph.train_teacher:
                _fail(key, ph.kind, "a teacher phase takes no init_from/teacher_from/train_teacher")
            if objective.needs_teacher:
                _fail(f"{key}.objective", ph.objective, "a teacher phase trains with labels only")
        elif ph.kind == "paraphraser":
            if ph.init_from or ph.train_teacher or ph.feature:
                _fail(key, ph.kind, "a paraphraser phase takes no init_from/train_teacher/feature")
            if not ph.teacher_from or seen[ph.teacher_from].kind != "teacher":
                _fail(f"{key}.teacher_from", ph.teacher_from, "a paraphraser phase needs a 'teacher' phase")
        elif ph.kind == "calibrate":
            if not ph.init_from or seen[ph.init_from].kind != "teacher":
                _fail(f"{key}.init_from", ph.init_from, "a calibrate phase starts from a 'teacher' phase")
        else:
            if not ph.init_from:
                _fail(f"{key}.init_from", ph.init_from, "a student phase needs the phase it starts from")
            if seen[ph.init_from].kind == "teacher":
                _fail(f"{key}.init_from", ph.init_from,
                      "a student starts from a 'calibrate' or 'student' phase, not from the FP teacher")
            if objective.needs_teacher and not ph.teacher_from:
                _fail(f"{key}.teacher_from", ph.teacher_from, f"objective {ph.objective!r} needs a teacher")
            if ph.train_teacher != (ph.objective == "co_study"):
                _fail(f"{key}.train_teacher", ph.train_teacher,
                      "train_teacher=True goes with objective='co_study' and only with it")
        _validate_aux_from(key, ph, seen)
        seen[name] = ph
