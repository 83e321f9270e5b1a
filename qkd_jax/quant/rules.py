"""Per-layer precision rules: which quantizer, how many bits, for every conv/dense layer.

A `RuleSet` is an ordered tuple of `Rule`s; a layer takes the first rule whose regex
`pattern` fully matches its module path (`'/'.join(module.path)`, e.g. 'layer1_0/conv1',
'stem', 'classifier'). Layers no rule matches stay full precision and are listed as such in the
report; a rule that matches no layer of a model is an error (`resolve` raises), so a typo never
silently leaves a model unquantized.

Signed inputs. Which layers receive inputs with negative values is a property of the model (the
model registry declares it, e.g. MobileNetV2's expand convs, whose input is a linear projection
plus a residual); `with_signed_inputs(rules, pattern)` attaches that declaration (a regex over
layer paths) to a RuleSet, and every quantized layer it matches gets `a_signed=True`, whatever its
rule says. Calibration checks the declaration: a layer left unsigned whose input has a negative
value raises (`calibration.UnsignedInputError`), so negatives are never clipped silently.

Methods (weight quantizer / activation quantizer, docs/method.md section 2):
    'interval'  learnable interval (EWGS / SQAKD-CIFAR) / learnable interval, with |output_scale|
    'pact'      DoReFa weights / PACT activations (learnable alpha)
    'lsq'       LSQ (learnable step) / LSQ
    'dorefa'    DoReFa / DoReFa (no learnable parameters)
    'qkd'       QKD interval (learnable I_W) / QKD interval (learnable I_X)
    'none'      full precision (same as fp=True)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from qkd_jax.quant.estimators import Estimator
from qkd_jax.quant.methods import QUANT_METHODS
from qkd_jax.quant.precision import FULL_PRECISION, LayerPrecision
from qkd_jax.quant.validation import check_bits

#: The registered quantizer methods (`qkd_jax.quant.methods`) and 'none' (full precision).
METHODS = (*QUANT_METHODS, "none")
#: Methods whose activation quantizer accepts `a_signed=True`.
SIGNED_ACTIVATION_METHODS = tuple(name for name, m in QUANT_METHODS.items() if m.signed_inputs)





def _check_optional_bits(bits: Any, name: str) -> Optional[int]:
    return None if bits is None else check_bits(bits, name)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rule:
    """One precision rule.

    Args:
      pattern: regex, fully matched against the layer path ('layer1_0/conv1').
      method: one of METHODS; 'none' (or fp=True) keeps the layer full precision.
      w_bits, a_bits: 1..8, or None to keep that side full precision (at least one is needed
        for a quantizing method).
      fp: shorthand for method='none'; takes no bits.
      a_signed: signed activation grid (methods with input_sign 'grid'; 'interval' covers negatives
        with its learnable lower bound and ignores it). Usually set from the model's declaration
        (`with_signed_inputs`) rather than by a rule.
      output_scale: learnable |output_scale| on the layer output; None = the method's default
        (True for 'interval', False otherwise).
      pact_alpha: constant initial PACT alpha (> 0) used by calibration; None = from data.
      estimator: the gradient estimator of the layer's rounding (`qkd_jax.quant.estimators.make`);
        None = EWGS with the layer's 'quant_delta' (0 = STE).
    """

    pattern: str
    method: str = "none"
    w_bits: Optional[int] = None
    a_bits: Optional[int] = None
    fp: bool = False
    a_signed: bool = False
    output_scale: Optional[bool] = None
    pact_alpha: Optional[float] = None
    estimator: Optional[Estimator] = None

    def __post_init__(self) -> None:
        if self.estimator is not None and not isinstance(self.estimator, Estimator):
            raise ValueError(f"Rule estimator must be an Estimator (qkd_jax.quant.estimators.make(name, options)), "
                             f"got {self.estimator!r}")
        if not isinstance(self.pattern, str):
            raise ValueError(f"Rule pattern must be a regex string, got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regex: {err}") from None
        if self.method not in METHODS:
            raise ValueError(f"Rule {self.pattern!r}: method must be one of {METHODS}, got {self.method!r}")
        if self.fp and self.method != "none":
            raise ValueError(f"Rule {self.pattern!r}: fp=True contradicts method={self.method!r}")
        if self.full_precision:
            if self.w_bits is not None or self.a_bits is not None:
                raise ValueError(
                    f"Rule {self.pattern!r} is full precision (fp=True / method='none') but sets "
                    f"w_bits={self.w_bits!r}, a_bits={self.a_bits!r}; drop the bits."
                )
            return
        _check_optional_bits(self.w_bits, f"Rule {self.pattern!r}: w_bits")
        _check_optional_bits(self.a_bits, f"Rule {self.pattern!r}: a_bits")
        if self.w_bits is None and self.a_bits is None:
            raise ValueError(
                f"Rule {self.pattern!r} with method={self.method!r} quantizes nothing: set w_bits "
                f"and/or a_bits (1..8), or use fp=True."
            )
        if self.a_signed and self.method not in SIGNED_ACTIVATION_METHODS:
            raise ValueError(
                f"Rule {self.pattern!r}: method {self.method!r} has no signed activation quantizer "
                f"(a_signed=True works with {SIGNED_ACTIVATION_METHODS})."
            )
        if self.pact_alpha is not None and (self.method != "pact" or not self.pact_alpha > 0):
            raise ValueError(f"Rule {self.pattern!r}: pact_alpha needs method='pact' and a value > 0")

    @property
    def full_precision(self) -> bool:
        return self.fp or self.method == "none"

    def matches(self, path: str) -> bool:
        """True when `pattern` fully matches the layer path."""
        return re.fullmatch(self.pattern, path) is not None

    def precision(self, index: Optional[int] = None) -> LayerPrecision:
        """The LayerPrecision this rule gives a layer it matches."""
        if self.full_precision:
            return LayerPrecision(rule=index, pattern=self.pattern)
        default = self.method in QUANT_METHODS and QUANT_METHODS[self.method].output_scale
        scale = default if self.output_scale is None else bool(self.output_scale)
        return LayerPrecision(
            method=self.method,
            w_bits=self.w_bits,
            a_bits=self.a_bits,
            a_signed=self.a_signed,
            output_scale=scale,
            pact_alpha=self.pact_alpha,
            estimator=self.estimator,
            rule=index,
            pattern=self.pattern,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleSet:
    """Ordered rules, first match wins; unmatched layers are full precision.

    `signed_inputs`: regex (fully matched) of the layers whose input is signed (the model's
    declaration); a quantized layer it matches gets a_signed=True. None: no layer is signed
    beyond what the rules say.
    """

    rules: tuple[Rule, ...]
    signed_inputs: Optional[str] = None

    def __post_init__(self) -> None:
        rules = tuple(self.rules)
        for r in rules:
            if not isinstance(r, Rule):
                raise ValueError(f"RuleSet takes Rule objects, got {r!r}")
        object.__setattr__(self, "rules", rules)
        if self.signed_inputs is not None:
            try:
                re.compile(self.signed_inputs)
            except (re.error, TypeError) as err:
                raise ValueError(f"signed_inputs {self.signed_inputs!r} is not a valid regex: {err}") from None

    def signed_input(self, path: str) -> bool:
        """True when the model declares the input of the layer at `path` signed."""
        return self.signed_inputs is not None and re.fullmatch(self.signed_inputs, path) is not None

    def match(self, path: str) -> LayerPrecision:
        """Precision of the layer at `path` (first matching rule; FULL_PRECISION when none)."""
        for i, rule in enumerate(self.rules):
            if rule.matches(path):
                lp = rule.precision(i)
                if lp.quantized and lp.a_bits is not None and not lp.a_signed and self.signed_input(path):
                    if not QUANT_METHODS[lp.method].signed_inputs:
                        raise ValueError(
                            f"layer {path!r} receives a signed input but method {lp.method!r} has no signed "
                            f"activation quantizer; keep its input full precision with a rule (a_bits=None).")
                    lp = dataclasses.replace(lp, a_signed=True)
                return lp
        return FULL_PRECISION


def with_signed_inputs(rules: RuleSet, pattern: Optional[str]) -> RuleSet:
    """`rules` with the model's signed-input declaration (a regex over layer paths, or None).

    Layers it matches get a_signed=True (every method quantizes a signed input: a signed grid, or
    the interval method's learnable lower bound). `resolve` raises when it matches no layer.
    """
    return dataclasses.replace(rules, signed_inputs=pattern)


def rule_set(*rules: Rule) -> RuleSet:
    """RuleSet from positional rules: rule_set(Rule(pattern='stem', fp=True), ...)."""
    return RuleSet(rules=rules)


def full_precision() -> RuleSet:
    """Every layer full precision (the student then computes exactly what the teacher does)."""
    return rule_set(Rule(pattern=".*", fp=True))


def uniform(method: str, w_bits: Optional[int], a_bits: Optional[int], **kw: Any) -> RuleSet:
    """Every conv/dense layer quantized the same way."""
    return rule_set(Rule(pattern=".*", method=method, w_bits=w_bits, a_bits=a_bits, **kw))


def sqakd_cifar(method: str, w_bits: int, a_bits: int, **kw: Any) -> RuleSet:
    """SQAKD / EWGS CIFAR ResNets: 'stem' and 'classifier' FP, every other conv quantized."""
    return rule_set(
        Rule(pattern="stem", fp=True),
        Rule(pattern="classifier", fp=True),
        Rule(pattern=".*", method=method, w_bits=w_bits, a_bits=a_bits, **kw),
    )


def sqakd_cifar_vgg(method: str, w_bits: int, a_bits: int, **kw: Any) -> RuleSet:
    """SQAKD CIFAR VGG: the first stage ('stem', 'stage1_conv*') and 'classifier' FP, the rest quantized."""
    return rule_set(
        Rule(pattern=r"stem|stage1_conv\d+", fp=True),
        Rule(pattern="classifier", fp=True),
        Rule(pattern=".*", method=method, w_bits=w_bits, a_bits=a_bits, **kw),
    )


def first_last_8bit(method: str, w_bits: int, a_bits: int, **kw: Any) -> RuleSet:
    """QKD / ImageNet: every conv and dense quantized, 'stem' and 'classifier' at W8A8.

    The stem's input is a normalised (signed) image: every method with a signed activation grid
    (LSQ, QKD, PACT, DoReFa) uses it there, the interval method its learnable lower bound. A
    method with no signed grid keeps the stem's input full precision (weights 8-bit).
    """
    if method == "none":
        return full_precision()
    sign = QUANT_METHODS[method].input_sign if method in QUANT_METHODS else "none"
    stem_a_bits: Optional[int] = None if sign == "none" else 8
    stem_signed = sign != "none"  # the interval method accepts it and keeps its lower bound
    return rule_set(
        Rule(pattern="stem", method=method, w_bits=8, a_bits=stem_a_bits, a_signed=stem_signed, **kw),
        Rule(pattern="classifier", method=method, w_bits=8, a_bits=8, **kw),
        Rule(pattern=".*", method=method, w_bits=w_bits, a_bits=a_bits, **kw),
    )


# ----------------------------------------------------------------------------- resolution


def quantizable_paths(tree: Union[Mapping[str, Any], Iterable[str]]) -> list[str]:
    """Paths ('a/b/c') of the conv/dense layers in a variables or params tree (dicts holding a
    'kernel'); a sequence of path strings is returned as a list unchanged."""
    if not isinstance(tree, Mapping):
        paths = list(tree)
        if not all(isinstance(p, str) for p in paths):
            raise ValueError("quantizable_paths takes a params/variables tree or a list of path strings")
        return paths
    if "params" in tree and isinstance(tree["params"], Mapping):
        tree = tree["params"]
    found: list[str] = []

    def visit(node: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        if "kernel" in node and not isinstance(node["kernel"], Mapping):
            found.append("/".join(prefix))
        for name, child in node.items():
            if isinstance(child, Mapping) and name != "quant":
                visit(child, prefix + (str(name),))

    visit(tree, ())
    return found


def resolve(rules: RuleSet, tree: Union[Mapping[str, Any], Iterable[str]]) -> dict[str, LayerPrecision]:
    """Precision of every conv/dense layer of `tree` (see `quantizable_paths`), in tree order.

    Raises:
      ValueError: when a rule matched no layer (it would be a silent no-op), naming the rule
        and listing the layer paths; when the signed-input declaration matched no layer.
    """
    paths = quantizable_paths(tree)
    if rules.signed_inputs is not None and not any(rules.signed_input(p) for p in paths):
        raise ValueError(f"signed_inputs {rules.signed_inputs!r} matched no layer; fix the model's "
                         f"declaration (models/registry.py). Layer paths: {paths}")
    resolved = {p: rules.match(p) for p in paths}
    used = {lp.rule for lp in resolved.values() if lp.rule is not None}
    unused = [(i, r) for i, r in enumerate(rules.rules) if i not in used]
    if unused:
        names = ", ".join(f"#{i} {r.pattern!r}" for i, r in unused)
        raise ValueError(
            f"precision rule(s) {names} matched no layer (a rule may also be shadowed by an "
            f"earlier one; first match wins). Layer paths: {paths}"
        )
    return resolved


def _bits(b: Optional[int]) -> str:
    return "-" if b is None else str(b)


def input_grid(lp: LayerPrecision) -> str:
    """How the layer quantizes its input: 'signed' or 'unsigned' grid, 'offset' (a learnable
    lower bound, the interval method), '-' (input full precision)."""
    if not lp.quantized or lp.a_bits is None:
        return "-"
    if QUANT_METHODS[lp.method].input_sign == "offset":
        return "offset"
    return "signed" if lp.a_signed or QUANT_METHODS[lp.method].input_sign == "always" else "unsigned"


def report(resolved: Mapping[str, LayerPrecision]) -> str:
    """Readable table: layer -> method, weight bits, activation bits, input grid, rule."""
    header = ("layer", "method", "W", "A", "input", "rule")
    rows = [header]
    for path, lp in resolved.items():
        method = lp.method if lp.quantized else "fp"
        rule = "no rule" if lp.rule is None else f"#{lp.rule} {lp.pattern!r}"
        rows.append((path or "<root>", method, _bits(lp.w_bits), _bits(lp.a_bits), input_grid(lp), rule))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    n_q = sum(lp.quantized for lp in resolved.values())
    lines.append(f"{n_q} of {len(resolved)} layers quantized")
    return "\n".join(lines)


def describe(rules: RuleSet, tree: Union[Mapping[str, Any], Sequence[str]]) -> str:
    """`report(resolve(rules, tree))`: resolves (raising on an unmatched rule) and formats."""
    return report(resolve(rules, tree))
