"""The experiment config files under configs/: they load, validate, and carry the published recipes.

No training: every config file and every ARG variant it documents (its VARIANTS tuple) is loaded
the way `--config=configs/X.py:ARG` loads it and checked with `config_schema.validate` against the
known models, datasets, quantizer methods and precision presets. Recipe values are asserted
against docs/method.md section 8 (and the released SQAKD scripts where the table is silent).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import jax
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from qkd_jax.run import config_schema
from qkd_jax.run.config_schema import (
    ConfigError,
    build_objective,
    group_spec,
    phase_names,
    validate,
)

# ml_collections loads config files with SourceFileLoader.load_module (deprecated in Python 3.11).
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs"
CONFIG_FILES = sorted(p.name for p in CONFIG_DIR.glob("*.py"))  # every .py file under configs/ is an experiment
EXPERIMENT_FILES = [n for n in CONFIG_FILES if not n.startswith("digits_")]  # digits_*: the demos on bundled data


def _load_module(name: str):
    """The config module, loaded by path like ml_collections does (no package import)."""
    spec = importlib.util.spec_from_file_location(f"_cfg_{name[:-3]}", CONFIG_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_MODULES: dict = {}


def module(name: str):
    if name not in _MODULES:
        _MODULES[name] = _load_module(name)
    return _MODULES[name]


def get(name: str, arg: str = "") -> ml_collections.ConfigDict:
    m = module(name)
    return m.get_config(arg) if arg or hasattr(m, "VARIANTS") else m.get_config()


def _known() -> dict:
    """The known_* lists validate() takes (those whose modules import)."""
    known = {}
    try:
        from qkd_jax.models.registry import list_models
        known["known_models"] = list_models()
    except ImportError:
        pass
    try:
        from qkd_jax.data import DATASETS
        known["known_datasets"] = DATASETS
    except ImportError:
        pass
    try:
        from qkd_jax.run import build
        known["known_methods"] = build.METHODS
        known["known_presets"] = list(build.PRESETS)
    except ImportError:
        pass
    return known


KNOWN = _known()


def parse_flags(*args: str) -> ml_collections.ConfigDict:
    """The config exactly as `python -m qkd_jax.main ARGS` sees it (locked, overrides applied)."""
    argv = ["prog", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def _variant_cases():
    cases = []
    for name in CONFIG_FILES:
        variants = getattr(module(name), "VARIANTS", None)
        cases.append((name, ""))
        cases.extend((name, v) for v in variants or ())
    return cases


# ----------------------------------------------------------------------------- loading and validation


def test_config_files_exist():
    expected = {
        "cifar10_resnet20.py", "cifar10_vgg8.py", "cifar100_resnet32.py", "cifar100_vgg13.py",
        "tiny_imagenet_resnet18.py", "tiny_imagenet_vgg11.py", "tiny_imagenet_mobilenet_v2.py",
        "tiny_imagenet_shufflenet_v2.py", "tiny_imagenet_squeezenet.py",
        "imagenet_resnet18.py", "imagenet_resnet34.py", "imagenet_mobilenet_v2.py", "imagenet_efficientnet_b0.py",
    }
    assert expected <= set(EXPERIMENT_FILES)


def test_known_lists_are_used():
    """The validation below runs against the real registries (not a skipped check)."""
    assert {"known_models", "known_datasets", "known_methods", "known_presets"} <= set(KNOWN)


@pytest.mark.parametrize("name,arg", _variant_cases())
def test_variant_loads_and_validates(name, arg):
    config = get(name, arg)
    validate(config, **KNOWN)
    for ph_name in phase_names(config):
        ph = config.phases[ph_name]
        for group in ("weights", "quant_params", "teacher_opt"):
            group_spec(ph[group])  # a valid GroupSpec


@pytest.mark.parametrize("name", EXPERIMENT_FILES)
def test_docstring_documents_variants_and_commands(name):
    m = module(name)
    doc = m.__doc__
    assert f"python -m qkd_jax.main --config=configs/{name}:" in doc
    assert "ARG" in doc
    assert m.VARIANTS[0] == "fp"
    for variant in m.VARIANTS:  # every documented variant builds a config with phases
        assert phase_names(get(name, variant)), variant
    keys = {get(name, v).to_json() for v in m.VARIANTS}
    assert len(keys) == len(m.VARIANTS)


@pytest.mark.parametrize("name", EXPERIMENT_FILES)
@pytest.mark.parametrize("arg", ["bogus", "sqakd,w9a9", "sqakd,w0a2", "fp,w2a2", "sqakd", "qat,sqakd,w2a2",
                                 "sqakd,w2a2,w4a4", "sqakd,,w2a2"])
def test_invalid_arg_names_valid_ones(name, arg):
    with pytest.raises(ValueError, match=r"invalid config ARG .*Valid: 'fp'.*paper settings: fp"):
        get(name, arg)


def test_invalid_arg_through_the_command_line():
    with pytest.raises(flags.IllegalFlagValueError, match="invalid config ARG 'sqakd,w9a2'"):
        parse_flags(f"--config={CONFIG_DIR / 'cifar10_resnet20.py'}:sqakd,w9a2")


def test_tiny_imagenet_needs_a_method_and_rejects_interval():
    with pytest.raises(ValueError, match="name a quantizer method"):
        get("tiny_imagenet_resnet18.py", "sqakd,w4a4")
    with pytest.raises(ValueError, match="unknown token 'interval'"):
        get("tiny_imagenet_resnet18.py", "sqakd,interval,w4a4")


def test_token_order_and_default_objective():
    a = get("tiny_imagenet_resnet18.py", "pact,w3a3")
    assert a.to_json() == get("tiny_imagenet_resnet18.py", "qat,pact,w3a3").to_json()
    assert a.to_json() == get("tiny_imagenet_resnet18.py", "W3A3, PACT").to_json()
    assert a.phases.student.objective == "task"
    assert get("cifar10_resnet20.py", "").to_json() == get("cifar10_resnet20.py", "sqakd,w2a2").to_json()
    assert get("imagenet_resnet18.py", "").to_json() == get("imagenet_resnet18.py", "qkd,w4a4").to_json()
    assert get("tiny_imagenet_vgg11.py", "").to_json() == get("tiny_imagenet_vgg11.py", "sqakd,pact,w4a4").to_json()


# ----------------------------------------------------------------------------- command-line overrides


def test_command_line_overrides_existing_keys():
    config = parse_flags(
        f"--config={CONFIG_DIR / 'cifar10_resnet20.py'}:sqakd,w2a2",
        "--config.quant.estimator=hessian",
        "--config.phases.student.alpha=3",
        "--config.teacher_checkpoint=/tmp/r20_fp/teacher",
    )
    assert config.quant.estimator == "hessian"
    assert config.phases.student.alpha == 3.0
    assert config.teacher_checkpoint == "/tmp/r20_fp/teacher"
    validate(config, **KNOWN)


def test_command_line_override_of_unknown_key_fails():
    with pytest.raises((AttributeError, KeyError, flags.Error), match="bogus"):
        parse_flags(f"--config={CONFIG_DIR / 'cifar10_resnet20.py'}:sqakd,w2a2", "--config.quant.bogus=1")
    with pytest.raises((AttributeError, KeyError, flags.Error), match="learning_rte"):
        parse_flags(f"--config={CONFIG_DIR / 'imagenet_resnet18.py'}:qkd,w4a4",
                    "--config.phases.co_study.teacher_opt.learning_rte=0.1")


def test_validate_rejects_an_extra_key_naming_it():
    config = get("cifar10_resnet20.py", "sqakd,w2a2")
    with config.unlocked():
        config.quant.bogus = 1
    with pytest.raises(ConfigError, match=r"quant\.bogus"):
        validate(config, **KNOWN)
    config = get("imagenet_resnet18.py", "qkd,w4a4")
    config.phases.tutoring.weights.learning_rte = 0.1
    with pytest.raises(ConfigError, match=r"learning_rte"):
        validate(config, **KNOWN)


@pytest.mark.parametrize("key,value", [("quant.w_bits", 9), ("quant.a_bits", 0), ("quant.estimator", "newton"),
                                       ("phases.student.batch_size", 0), ("quant.delta", -1.0),
                                       ("quant.hessian_probe", "blockwise"), ("quant.hessian_loss", "kl")])
def test_validate_rejects_impossible_values_naming_the_key(key, value):
    config = get("cifar10_resnet20.py", "sqakd,w2a2")
    section, *rest = key.split(".")
    node = config[section]
    for part in rest[:-1]:
        node = node[part]
    node[rest[-1]] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(config, **KNOWN)


def test_w9_from_the_command_line_fails_validation():
    config = parse_flags(f"--config={CONFIG_DIR / 'cifar10_resnet20.py'}:sqakd,w2a2", "--config.quant.w_bits=9")
    with pytest.raises(ConfigError, match=r"quant\.w_bits"):
        validate(config, **KNOWN)


def test_phase_overrides_are_independent():
    """Each phase owns its optimizer ConfigDicts: overriding one phase leaves the others alone."""
    config = parse_flags(f"--config={CONFIG_DIR / 'imagenet_resnet18.py'}:qkd,w4a4",
                         "--config.phases.self_study.weights.learning_rate=0.5")
    assert config.phases.self_study.weights.learning_rate == 0.5
    assert config.phases.co_study.weights.learning_rate == 1e-2
    assert config.phases.tutoring.weights.learning_rate == 1e-2
    assert config.phases.co_study.teacher_opt.learning_rate == 1e-2


# ----------------------------------------------------------------------------- recipe values (docs/method.md section 8)


def _opt(cfg, **expected):
    for key, value in expected.items():
        got = cfg[key]
        if isinstance(value, float):
            assert math.isclose(got, value, rel_tol=1e-12), (key, got, value)
        else:
            assert got == value, (key, got, value)


def _objective(ph):
    return build_objective(ph)


def test_cifar10_resnet20_sqakd_w2a2():
    c = get("cifar10_resnet20.py", "sqakd,w2a2")
    assert (c.dataset.name, c.model.name, c.model.num_classes) == ("cifar10", "resnet20", 10)
    assert (c.dataset.augment, c.dataset.image_size) == ("cifar", 32)
    assert (c.quant.method, c.quant.w_bits, c.quant.a_bits, c.quant.preset) == ("interval", 2, 2, "sqakd_cifar")
    assert (c.quant.estimator, c.quant.delta) == ("ste", 0.0)
    assert phase_names(c) == ["teacher", "calibrate", "student"]
    t, cal, s = (c.phases[n] for n in phase_names(c))
    # FP teacher: SGD 0.1, momentum 0.9, wd 1e-4, batch 256, cosine, 1200 epochs.
    assert (t.kind, t.objective, t.epochs, t.batch_size) == ("teacher", "task", 1200, 256)
    _opt(t.weights, optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine_epoch")
    assert (cal.kind, cal.init_from) == ("calibrate", "teacher")
    # Student: Adam 1e-3 + coupled L2 1e-4 (weights), Adam 1e-5 (quantizer), batch 256, 1200 epochs.
    assert (s.kind, s.init_from, s.teacher_from, s.epochs, s.batch_size) == (
        "student", "calibrate", "teacher", 1200, 256)
    _opt(s.weights, optimizer="adam", learning_rate=1e-3, weight_decay=1e-4, schedule="cosine_epoch")
    assert group_spec(s.weights).decay_mode == "coupled"
    _opt(s.quant_params, optimizer="adam", learning_rate=1e-5, weight_decay=0.0, schedule="cosine_epoch")
    # SQAKD: alpha 1, T 4, labels never used.
    assert (s.objective, s.alpha, s.temperature) == ("sqakd", 1.0, 4.0)
    obj = _objective(s)
    assert not obj.needs_labels and obj.needs_teacher


def test_cifar10_resnet20_qat_uses_labels_only():
    s = get("cifar10_resnet20.py", "qat,w1a1").phases.student
    assert (s.objective, s.teacher_from, s.label_smoothing) == ("task", "", 0.0)
    obj = _objective(s)
    assert obj.needs_labels and not obj.needs_teacher


def test_fp_variant_is_the_teacher_phase_alone():
    c = get("cifar10_resnet20.py", "fp")
    assert phase_names(c) == ["teacher"]
    assert c.phases.teacher.to_json() == get("cifar10_resnet20.py", "sqakd,w4a4").phases.teacher.to_json()


def test_cifar10_vgg8():
    c = get("cifar10_vgg8.py", "sqakd,w2a2")
    assert (c.model.name, c.quant.preset) == ("vgg8", "sqakd_cifar_vgg")
    assert c.phases.teacher.epochs == c.phases.student.epochs == 400
    assert c.phases.student.alpha == 1.0


@pytest.mark.parametrize("name,model,preset", [("cifar100_resnet32.py", "resnet32", "sqakd_cifar"),
                                               ("cifar100_vgg13.py", "vgg13", "sqakd_cifar_vgg")])
def test_cifar100_recipe(name, model, preset):
    c = get(name, "sqakd,w2a2")
    assert (c.dataset.name, c.model.name, c.model.num_classes, c.quant.preset) == ("cifar100", model, 100, preset)
    t, s = c.phases.teacher, c.phases.student
    assert (t.epochs, t.batch_size, s.epochs, s.batch_size) == (720, 64, 720, 64)
    _opt(t.weights, optimizer="sgd", learning_rate=0.05, momentum=0.9, weight_decay=5e-4, schedule="cosine_epoch")
    _opt(s.weights, optimizer="adam", learning_rate=5e-4, weight_decay=5e-4, schedule="cosine_epoch")
    _opt(s.quant_params, optimizer="adam", learning_rate=5e-6, weight_decay=0.0)
    assert s.alpha == 1.0


def test_cifar100_resnet32_w4a4_alpha_100():
    assert get("cifar100_resnet32.py", "sqakd,w4a4").phases.student.alpha == 100.0
    assert get("cifar100_resnet32.py", "sqakd,w1a1").phases.student.alpha == 1.0
    assert get("cifar100_vgg13.py", "sqakd,w4a4").phases.student.alpha == 1.0


TINY = {
    "tiny_imagenet_resnet18.py": "resnet18",
    "tiny_imagenet_vgg11.py": "vgg11_bn_tiny",
    "tiny_imagenet_mobilenet_v2.py": "mobilenet_v2",
    "tiny_imagenet_shufflenet_v2.py": "shufflenet_v2_x0_5",
    "tiny_imagenet_squeezenet.py": "squeezenet1_0",
}


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("method", ["pact", "lsq", "dorefa"])
def test_tiny_imagenet_recipe(name, method):
    qat = get(name, f"qat,{method},w4a4")
    assert (qat.dataset.name, qat.model.name, qat.model.num_classes) == ("tiny_imagenet", TINY[name], 200)
    assert (qat.dataset.image_size, qat.dataset.augment) == (224, "imagenet")
    # The released (MQBench) quantizers and preset by default (docs/method.md section 9).
    assert (qat.quant.method, qat.quant.variant, qat.quant.preset) == (method, "released", "mqbench_academic")
    t, s = qat.phases.teacher, qat.phases.student
    assert t.epochs == s.epochs == 100
    # Label smoothing 0.1 for the FP teacher and for plain QAT.
    assert t.label_smoothing == s.label_smoothing == 0.1
    for opt in (t.weights, s.weights, s.quant_params):
        _opt(opt, optimizer="sgd", momentum=0.9, nesterov=True, schedule="warmup_cosine", warmup_steps=2500,
             warmup_init_lr=1e-4)
    _opt(s.weights, learning_rate=5e-4, weight_decay=5e-4)
    # One SGD for every parameter in the released code: the quantizer group decays like the weights.
    _opt(s.quant_params, learning_rate=5e-4, weight_decay=5e-4)
    if TINY[name] == "mobilenet_v2":
        _opt(t.weights, learning_rate=4e-3, weight_decay=1e-4)
    else:
        _opt(t.weights, learning_rate=5e-2, weight_decay=5e-4)
    low = get(name, f"qat,{method},w3a3").phases.student
    _opt(low.weights, learning_rate=4e-3, weight_decay=1e-4)
    _opt(low.quant_params, learning_rate=4e-3, weight_decay=1e-4)
    sq = get(name, f"sqakd,{method},w4a4").phases.student
    assert (sq.objective, sq.teacher_from, sq.temperature, sq.label_smoothing) == ("sqakd", "teacher", 4.0, 0.0)
    assert not _objective(sq).needs_labels


@pytest.mark.parametrize("name,bits,method,alpha", [
    ("tiny_imagenet_resnet18.py", "w4a4", "pact", 1.0),
    ("tiny_imagenet_resnet18.py", "w3a3", "lsq", 1.0),
    ("tiny_imagenet_mobilenet_v2.py", "w4a4", "pact", 100.0),
    ("tiny_imagenet_mobilenet_v2.py", "w3a3", "pact", 10.0),
    ("tiny_imagenet_mobilenet_v2.py", "w8a8", "lsq", 300.0),
    ("tiny_imagenet_vgg11.py", "w4a4", "lsq", 200.0),
    ("tiny_imagenet_vgg11.py", "w8a8", "dorefa", 100.0),
    ("tiny_imagenet_shufflenet_v2.py", "w8a8", "dorefa", 800.0),
    ("tiny_imagenet_shufflenet_v2.py", "w4a4", "pact", 100.0),
    ("tiny_imagenet_squeezenet.py", "w4a4", "lsq", 50.0),
])
def test_tiny_imagenet_sqakd_alpha(name, bits, method, alpha):
    s = get(name, f"sqakd,{method},{bits}").phases.student
    assert s.alpha == alpha  # docs/method.md section 8: alpha 1 (ResNet-18), 10-800 others


@pytest.mark.parametrize("method", ["pact", "lsq", "dorefa"])
def test_tiny_imagenet_vgg11_is_the_released_network_and_precision(method):
    """The released TinyImageNet/models/vgg.py vgg11_bn: 8 convs + Linear(512, 200); MQBench's
    Academic backend keeps the first conv and the last linear at 32 bits, quantizes the rest."""
    from qkd_jax.models import get_model
    from qkd_jax.quant import rules as qrules
    from qkd_jax.run import build

    config = get("tiny_imagenet_vgg11.py", f"sqakd,{method},w4a4")
    model = get_model(config.model.name, config.model.num_classes)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, 64, 64, 3)), train=False))
    assert shapes["params"]["classifier"]["kernel"].shape == (512, 200)
    resolved = qrules.resolve(build.student_rules(config), shapes["params"])
    assert len(resolved) == 9
    released = f"{method}_released"
    # Released: stem and classifier are the 32-bit layers (full range: PACT / DoReFa transforms
    # only; LSQ full precision).
    edges = {p: lp for p, lp in resolved.items() if p in ("stem", "classifier")}
    if method == "lsq":
        assert not any(lp.quantized for lp in edges.values())
    else:
        assert all((lp.method, lp.full_range, lp.w_bits, lp.a_bits) == (released, True, 32, 32)
                   for lp in edges.values())
    assert all((lp.method, lp.full_range, lp.w_bits, lp.a_bits) == (released, False, 4, 4)
               for p, lp in resolved.items() if p not in ("stem", "classifier"))
    # Textbook: the same two layers full precision (preset 'sqakd_cifar'), the textbook record elsewhere.
    config.quant.variant, config.quant.preset = "textbook", "sqakd_cifar"
    resolved = qrules.resolve(build.student_rules(config), shapes["params"])
    assert {p for p, lp in resolved.items() if not lp.quantized} == {"stem", "classifier"}
    assert all((lp.method, lp.w_bits, lp.a_bits) == (method, 4, 4) for p, lp in resolved.items()
               if p not in ("stem", "classifier"))


def test_tiny_imagenet_batch_sizes():
    assert get("tiny_imagenet_resnet18.py", "sqakd,lsq,w4a4").phases.student.batch_size == 64
    assert get("tiny_imagenet_vgg11.py", "sqakd,pact,w4a4").phases.student.batch_size == 32
    assert get("tiny_imagenet_mobilenet_v2.py", "sqakd,pact,w4a4").phases.student.batch_size == 64
    assert get("tiny_imagenet_mobilenet_v2.py", "sqakd,lsq,w4a4").phases.student.batch_size == 32


@pytest.mark.parametrize("name,model", [("imagenet_resnet18.py", "resnet18"), ("imagenet_resnet34.py", "resnet34")])
@pytest.mark.parametrize("bits", ["w2a2", "w3a3", "w4a4"])
def test_imagenet_qkd(name, model, bits):
    c = get(name, f"qkd,{bits}")
    w = int(bits[1])
    assert (c.dataset.name, c.model.name, c.model.num_classes, c.dataset.image_size) == (
        "imagenet2012", model, 1000, 224)
    assert (c.quant.method, c.quant.preset, c.quant.w_bits, c.quant.a_bits) == ("qkd", "first_last_8bit", w, w)
    assert phase_names(c) == ["teacher", "calibrate", "self_study", "co_study", "tutoring"]
    ss, cs, tu = c.phases.self_study, c.phases.co_study, c.phases.tutoring
    assert (ss.objective, ss.init_from, ss.teacher_from, ss.train_teacher) == ("self_study", "calibrate", "", False)
    assert (cs.objective, cs.init_from, cs.teacher_from, cs.train_teacher) == ("co_study", "self_study", "teacher", True)
    assert (tu.objective, tu.init_from, tu.teacher_from, tu.train_teacher) == ("tutoring", "co_study", "co_study", False)
    assert cs.temperature == tu.temperature == 2.0
    # 30/100/70 of 200 CIFAR epochs scaled to 100: the phases share the ImageNet 100-epoch budget.
    assert (ss.epochs, cs.epochs, tu.epochs) == (15, 50, 35)
    for ph in (ss, cs, tu):
        assert ph.batch_size == 256
        _opt(ph.weights, optimizer="sgd", learning_rate=1e-2, momentum=0.9, weight_decay=1e-4, schedule="cosine_epoch")
        _opt(ph.quant_params, optimizer="adam", learning_rate=1e-5, weight_decay=0.0, schedule="cosine_epoch")
        assert _objective(ph).needs_labels
    _opt(cs.teacher_opt, optimizer="sgd", learning_rate=1e-2, momentum=0.9, weight_decay=1e-4)
    assert _objective(cs).needs_teacher and _objective(tu).needs_teacher


@pytest.mark.parametrize("objective,method", [("sqakd", "interval"), ("qat", "interval")])
def test_imagenet_ewgs_and_sqakd(objective, method):
    c = get("imagenet_resnet34.py", f"{objective},w4a4")
    assert phase_names(c) == ["teacher", "calibrate", "student"]
    s = c.phases.student
    assert (c.quant.method, s.epochs, s.batch_size) == (method, 100, 256)
    _opt(s.weights, optimizer="sgd", learning_rate=1e-2, momentum=0.9, weight_decay=1e-4, schedule="cosine_epoch")
    _opt(s.quant_params, optimizer="adam", learning_rate=1e-5, weight_decay=0.0, schedule="cosine_epoch")
    assert s.objective == {"sqakd": "sqakd", "qat": "task"}[objective]
    # The EWGS ImageNet Hessian schedule, ready for --config.quant.estimator=hessian.
    assert (c.quant.hessian_every_epochs, c.quant.hessian_batches, c.quant.hessian_batch_size) == (1, 10, 16)
    assert get("imagenet_resnet34.py", "sqakd,lsq,w4a4").quant.method == "lsq"


def test_imagenet_teacher_trains_or_loads():
    c = get("imagenet_resnet18.py", "fp")
    assert phase_names(c) == ["teacher"] and c.teacher_checkpoint == ""
    _opt(c.phases.teacher.weights, optimizer="sgd", learning_rate=0.1, schedule="step", decay_epochs=(30, 60))


# ----------------------------------------------------------------------------- the precision preset fits the model


def _rule_cases():
    cases = []
    for name in EXPERIMENT_FILES:
        m = module(name)
        methods = {get(name, v).quant.method for v in m.VARIANTS if v != "fp"}
        cases.extend((name, method) for method in sorted(methods))
    return cases


@pytest.mark.parametrize("name,method", _rule_cases())
def test_precision_rules_match_the_model(name, method):
    """Every rule of the config's preset matches a layer of its model (resolve raises otherwise)."""
    from qkd_jax.models import get_model
    from qkd_jax.quant import rules as qrules
    from qkd_jax.run import build

    variant = next(v for v in module(name).VARIANTS if v != "fp" and get(name, v).quant.method == method)
    config = get(name, variant)
    model = get_model(config.model.name, config.model.num_classes)
    size = 32 if config.dataset.name.startswith("cifar") else 64  # layer paths do not depend on the size
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, size, size, 3)), train=False))
    resolved = qrules.resolve(build.student_rules(config), shapes["params"])
    assert any(lp.quantized for lp in resolved.values())
    if config.quant.preset == "first_last_8bit":
        assert sum(lp.quantized and lp.w_bits == 8 for lp in resolved.values()) >= 2
    elif config.quant.preset == "mqbench_academic":  # released 32-bit layers: full range or FP
        assert all(lp.full_range or not lp.quantized for p, lp in resolved.items() if p in ("stem", "classifier"))
    else:
        assert any(not lp.quantized for lp in resolved.values())  # stem / classifier stay FP


def test_schema_module_is_the_one_configs_use():
    """qkd_jax/run/recipes.py, which every config file uses, builds on qkd_jax.run.config_schema."""
    common = module("cifar10_resnet20.py").common
    assert common.base_config is config_schema.base_config
    assert common.phase is config_schema.phase


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("method", ["pact", "lsq", "dorefa"])
def test_tiny_imagenet_variant_key(name, method):
    """Released quantizers by default; quant.variant='textbook' with a textbook preset selects the
    library's records (the previous default); the key is validated with a one-line fix."""
    from qkd_jax.run import build
    from qkd_jax.run.recipes import tiny_textbook_preset

    config = get(name, f"sqakd,{method},w4a4")
    validate(config, **KNOWN)
    assert (config.quant.variant, build.student_method(config)) == ("released", f"{method}_released")
    config.quant.variant, config.quant.preset = "textbook", tiny_textbook_preset(TINY[name])
    validate(config, **KNOWN)
    assert build.student_method(config) == method
    assert config.quant.preset == ("sqakd_cifar" if TINY[name] == "vgg11_bn_tiny" else "first_last_8bit")
    config.quant.preset = "mqbench_academic"  # the released preset needs the released records
    with pytest.raises(ConfigError, match="mqbench_academic.*quant.variant='released'"):
        validate(config, **KNOWN)
    config.quant.variant = "release"
    with pytest.raises(ConfigError, match="quant.variant.*must be one of"):
        validate(config, **KNOWN)


def test_released_variant_rejects_what_it_cannot_reproduce():
    config = get("tiny_imagenet_resnet18.py", "sqakd,pact,w4a4")
    config.quant.pact_alpha = 3.0
    with pytest.raises(ConfigError, match="released PACT alpha is the constant 6"):
        validate(config, **KNOWN)
    config = get("tiny_imagenet_resnet18.py", "sqakd,lsq,w1a4")
    with pytest.raises(ConfigError, match="2..8 bits"):
        validate(config, **KNOWN)
    config = get("cifar10_resnet20.py", "")
    config.quant.variant = "released"
    with pytest.raises(ConfigError, match="not quant.method='interval'"):
        validate(config, **KNOWN)


# ----------------------------------------------------------------------------- QKD on CIFAR and depthwise nets

CIFAR_FILES = {"cifar10_resnet20.py": ("resnet20", 256, 1e-3, 1e-4, 1e-5),
               "cifar10_vgg8.py": ("vgg8", 256, 1e-3, 1e-4, 1e-5),
               "cifar100_resnet32.py": ("resnet32", 64, 5e-4, 5e-4, 5e-6),
               "cifar100_vgg13.py": ("vgg13", 64, 5e-4, 5e-4, 5e-6)}


@pytest.mark.parametrize("name", sorted(CIFAR_FILES))
@pytest.mark.parametrize("bits", ["w2a2", "w3a3", "w4a4"])
def test_cifar_qkd(name, bits):
    """QKD's CIFAR schedule 30/100/70 epochs, T = 2, the 'qkd' quantizer, the file's model and recipe."""
    model, batch, lr, wd, qlr = CIFAR_FILES[name]
    assert f"qkd,{bits}" in module(name).VARIANTS
    c = get(name, f"qkd,{bits}")
    w = int(bits[1])
    assert (c.model.name, c.quant.method, c.quant.w_bits, c.quant.a_bits) == (model, "qkd", w, w)
    assert phase_names(c) == ["teacher", "calibrate", "self_study", "co_study", "tutoring"]
    ss, cs, tu = c.phases.self_study, c.phases.co_study, c.phases.tutoring
    assert (ss.epochs, cs.epochs, tu.epochs) == (30, 100, 70)
    assert (cs.init_from, cs.teacher_from, cs.train_teacher) == ("self_study", "teacher", True)
    assert (tu.init_from, tu.teacher_from, tu.train_teacher) == ("co_study", "co_study", False)
    assert cs.temperature == tu.temperature == 2.0
    for ph in (ss, cs, tu):
        assert ph.batch_size == batch
        _opt(ph.weights, optimizer="adam", learning_rate=lr, weight_decay=wd, schedule="cosine_epoch")
        _opt(ph.quant_params, optimizer="adam", learning_rate=qlr, weight_decay=0.0)
    _opt(cs.teacher_opt, optimizer="adam", learning_rate=lr, weight_decay=wd)
    assert c.phases.teacher.epochs == get(name, "fp").phases.teacher.epochs
    # a method token still selects another quantizer; the SQAKD default is unchanged
    assert get(name, f"qkd,interval,{bits}").quant.method == "interval"
    assert get(name, "sqakd,w2a2").quant.method == "interval"


@pytest.mark.parametrize("name,model", [("imagenet_mobilenet_v2.py", "mobilenet_v2"),
                                        ("imagenet_efficientnet_b0.py", "efficientnet_b0")])
def test_imagenet_depthwise_qkd(name, model):
    assert module(name).VARIANTS == ("fp", "qkd,w4a4", "qkd,w5a5", "qkd,w6a6")
    for bits in ("w4a4", "w5a5", "w6a6"):
        c = get(name, f"qkd,{bits}")
        assert (c.model.name, c.dataset.name, c.quant.method, c.quant.preset) == (
            model, "imagenet2012", "qkd", "first_last_8bit")
        assert c.quant.w_bits == c.quant.a_bits == int(bits[1])
        ss, cs, tu = c.phases.self_study, c.phases.co_study, c.phases.tutoring
        assert (ss.epochs, cs.epochs, tu.epochs) == (15, 50, 35)
        assert cs.train_teacher and tu.teacher_from == "co_study" and cs.temperature == 2.0
    t = get(name, "fp").phases.teacher  # torchvision's MobileNetV2 recipe
    assert t.epochs == 300
    _opt(t.weights, optimizer="sgd", learning_rate=0.045, momentum=0.9, weight_decay=4e-5, schedule="step",
         decay_factor=0.98)
    assert tuple(t.weights.decay_epochs) == tuple(range(1, 300))


# ----------------------------------------------------------------------------- EWGS Hessian probe

def test_paper_configs_use_the_released_hessian_probe():
    """Per-layer probes of the cross-entropy Hessian (released EWGS code) in every experiment config."""
    for name, arg in _variant_cases():
        if name.startswith("digits_"):
            continue
        q = get(name, arg).quant
        assert (q.hessian_probe, q.hessian_loss) == ("per_layer", "ce"), (name, arg)
    q = get("cifar100_resnet32.py", "sqakd,w2a2").quant  # released: the training loader's batches
    assert (q.hessian_every_epochs, q.hessian_batches, q.hessian_batch_size) == (10, 3, 64)


@pytest.mark.parametrize("loss", ["ce", "phase"])
def test_hessian_plan_and_record(loss, tmp_path):
    """The plan carries the probe and the loss (CE with labels, or the phase's label-free KL); the
    phase record holds both keys only when the Hessian refreshes the delta."""
    from qkd_jax.run.plan import make_plan
    from qkd_jax.run.record import phase_record

    config = get("cifar10_resnet20.py", "sqakd,w2a2")
    plain = phase_record(config, make_plan(config, tmp_path, "student", 10))
    assert "quant.hessian_probe" not in plain and "quant.hessian_loss" not in plain
    config.quant.estimator = "hessian"
    config.quant.hessian_probe = "joint"
    config.quant.hessian_loss = loss
    plan = make_plan(config, tmp_path, "student", 10)
    assert plan.hessian.probe == "joint"
    assert plan.hessian.objective.needs_labels == (loss == "ce")
    assert plan.hessian.objective.needs_teacher == (loss == "phase")  # SQAKD's KL reads the teacher
    rec = phase_record(config, plan)
    assert (rec["quant.hessian_probe"], rec["quant.hessian_loss"]) == ("joint", loss)
