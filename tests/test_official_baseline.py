"""benchmarks/official_baseline.py: the alternation and ratio arithmetic against a fake clock, and
its use of the official code's interfaces (argparse fields, the `init=1` quantizer
initialisation, the weight / quantizer optimizer split) against a stand-in of the official
`CIFAR/models/custom_models_resnet.py` written by the test (the official code itself is not
part of this repository and cannot be fetched here)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import textwrap

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A stand-in with the official module's names and the interfaces the benchmark touches: the
# constructors take train_quant.py's namespace, a quantized conv has `init`, `act_quantization`
# and the lW/uW/lA/uA/lA_t/uA_t/output_scale parameters, and an `init == 1` forward sets them.
STAND_IN = '''
import torch, torch.nn as nn, torch.nn.functional as F
print("constructors print here")

class QConv(nn.Conv2d):
    def __init__(self, cin, cout, args):
        super().__init__(cin, cout, 3, padding=1, bias=False)
        self.levels = args.act_levels
        for n in ("lW", "uW", "lA", "uA", "lA_t", "uA_t"):
            setattr(self, n, nn.Parameter(torch.tensor(0.0)))
        self.output_scale = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("init", torch.tensor([0]))
        self.initialised = 0

    def act_quantization(self, x):
        x = ((x - self.lA) / (self.uA - self.lA)).clamp(0, 1)
        return x + (torch.round(x * (self.levels - 1)) / (self.levels - 1) - x).detach()

    def forward(self, x):
        if self.init == 1:
            self.uA.data.fill_(float(x.abs().max()) + 1.0)
            self.initialised += 1
        return F.conv2d(self.act_quantization(x), self.weight, padding=1) * self.output_scale

class Net(nn.Module):
    def __init__(self, args, quant):
        super().__init__()
        assert args.QWeightFlag and args.QActFlag and not args.baseline
        assert args.bkwd_scaling_factorW == 0.0 and args.bkwd_scaling_factorA == 0.0
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.body = QConv(4, 4, args) if quant else nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.linear = nn.Linear(4, args.num_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        return self.linear(F.relu(self.body(x)).mean((2, 3)))

def resnet20_fp(args):
    return Net(args, quant=False)

def resnet20_quant(args):
    return Net(args, quant=True)
'''


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("official_baseline_bench", ROOT / "benchmarks" / "official_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    models = tmp_path / "CIFAR" / "models"
    models.mkdir(parents=True)
    (models / "__init__.py").write_text("")
    (models / "custom_models_resnet.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_official prepends the clone's CIFAR/
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        monkeypatch.delitem(sys.modules, name)
    yield tmp_path
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]


def test_alternation_order_and_ratio_against_a_fake_clock(bench, monkeypatch):
    """Official steps take 2 clock units, qkd_jax's 3: every median is exact, the ratio is 1.5,
    each round warms each side up once, and the side that goes first alternates."""
    clock = {"t": 0.0}
    calls = []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock["t"])

    def side(name, cost):
        def step():
            calls.append(name)
            clock["t"] += cost
        return step

    result = bench.alternate(side("official", 2.0), side("qkd_jax", 3.0), rounds=3, steps=2)
    assert calls == (["official"] * 3 + ["qkd_jax"] * 3) + (["qkd_jax"] * 3 + ["official"] * 3) \
        + (["official"] * 3 + ["qkd_jax"] * 3)
    assert result["times"] == {"official": [2.0] * 6, "qkd_jax": [3.0] * 6}
    row = bench.summarize("sqakd", result)
    assert (row["official_s"], row["qkd_jax_s"], row["ratio"], row["round_ratios"]) == (2.0, 3.0, 1.5, [1.5] * 3)


def test_a_folder_without_the_official_code_is_refused_with_the_clone_command(bench, tmp_path):
    with pytest.raises(SystemExit, match="git clone https://github.com/kaiqi123/SQAKD"):
        bench.load_official(str(tmp_path))


def test_official_step_initialises_the_quantizers_and_splits_the_optimizers(bench, stand_in):
    """The student is initialised as utils.init_quant_model does (one forward at init=1, then
    init=0), takes the teacher's weights, and one step moves the weights at Adam 1e-3 and the
    quantizer parameters at Adam 1e-5: Adam's first step moves each parameter by its learning
    rate (times sign of the gradient) wherever the gradient is not tiny."""
    import torch

    module = bench.load_official(str(stand_in))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 10, 4)
    created = []
    real = module.resnet20_quant
    module.resnet20_quant = lambda args: created.append(real(args)) or created[-1]
    try:
        step = bench.official_step(module, "sqakd", images, labels, 2, 2, 10, "cpu")
    finally:
        module.resnet20_quant = real
    (student,) = created
    body = student.body
    assert body.initialised == 1 and int(body.init) == 0
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in student.named_parameters()}
    assert moved["body.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["linear.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["body.uA"] == pytest.approx(1e-5, rel=1e-2)
    assert moved["body.output_scale"] == pytest.approx(1e-5, rel=1e-2)
    assert moved["body.lA_t"] == 0.0  # in the quantizer group, but no gradient reaches it
    assert torch.is_tensor(body.uA)


@pytest.mark.slow  # compiles the qkd_jax ResNet-20 steps (about 30 s)
def test_tiny_run_against_the_stand_in_writes_consistent_figures(bench, stand_in, tmp_path):
    out = tmp_path / "baseline.json"
    bench.main([f"--sqakd-src={stand_in}", "--tiny", f"--out={out}"])
    result = json.loads(out.read_text())
    assert [r["case"] for r in result["rows"]] == ["sqakd", "fp"]
    for row in result["rows"]:
        assert len(row["times"]["official"]) == len(row["times"]["qkd_jax"]) == 2  # 2 rounds x 1 step
        assert row["ratio"] == pytest.approx(row["qkd_jax_s"] / row["official_s"], rel=1e-12)
