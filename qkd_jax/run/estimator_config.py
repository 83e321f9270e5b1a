"""`quant.estimator` / `quant.estimator_options` of a config: parsed, validated, turned into the
estimator every quantized layer's rule carries (docs/method.md section 12).

    --config.quant.estimator=dsq --config.quant.estimator_options=alpha=0.3
    --config.quant.estimator=noise --config.quant.estimator_options='rate=0.5'

`estimator_options` is 'key=value' pairs separated by commas, each value a Python literal (a number,
None). 'ste', 'ewgs' without options and 'hessian' are the EWGS rule with the layers' 'quant_delta'
(quant.delta, or the Hessian refresh: the numbers of every run before estimators were pluggable),
so their layers carry no estimator; any other registered name (`qkd_jax.quant.estimators.ESTIMATORS`,
custom ones included once registered) gives every quantized layer that estimator.
"""

from __future__ import annotations

import ast
from typing import Any, Optional

import ml_collections

from qkd_jax.quant import estimators

#: Names with the legacy EWGS path through 'quant_delta' ('hessian' refreshes it from Hessian traces).
LEGACY = ("ste", "ewgs", "hessian")


def known_estimators() -> list[str]:
    """Every name quant.estimator accepts: the registry and 'hessian'."""
    return sorted({*estimators.ESTIMATORS, "hessian"})


def parse_options(text: str) -> dict[str, Any]:
    """'alpha=0.3,rate=1' -> {'alpha': 0.3, 'rate': 1}; raises ValueError naming the bad pair."""
    out: dict[str, Any] = {}
    for pair in (p.strip() for p in str(text).split(",")):
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ValueError(f"{pair!r} is not key=value (e.g. 'alpha=0.3,threshold=1.5')")
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise ValueError(f"{pair!r}: the value {value.strip()!r} is not a number or None") from None
        if isinstance(out[key], int) and not isinstance(out[key], bool):
            out[key] = float(out[key])
    return out


def config_estimator(q: ml_collections.ConfigDict) -> Optional[estimators.Estimator]:
    """The estimator the student's quantized layers carry; None for the legacy EWGS path.

    Raises ValueError with one line (unknown name listing the registered ones, a bad option).
    """
    name = q.estimator
    text = q.get("estimator_options", "")
    if name not in known_estimators():
        raise ValueError(f"unknown gradient estimator {name!r}; registered: {known_estimators()}")
    options = parse_options(text)
    if name in ("ste", "hessian") or (name == "ewgs" and not options):
        if options:
            raise ValueError(f"estimator {name!r} takes no estimator_options (EWGS's delta: quant.delta; "
                             f"the Hessian schedule: quant.hessian_*)")
        return None
    return estimators.make(name, options)
