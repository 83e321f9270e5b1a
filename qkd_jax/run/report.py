"""A phase's evaluation history and what the run summary reports from it.

The released SQAKD code reports the best epoch's top-1 and the mean top-1 of the last 5 epochs;
the summary reports both next to the final value. The history lives in the phase's checkpoint
metadata (`eval_history`), so a resumed phase continues the history of the checkpoint it
resumes from: epochs evaluated after that checkpoint and lost with the run are evaluated again,
and appear once.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

LAST_N = 5
EvalRecord = dict[str, float]


def eval_record(epoch: int, metrics: Mapping[str, Any]) -> EvalRecord:
    """One history entry: the epoch after which the phase was evaluated, top-1/top-5 %, loss."""
    return {"epoch": int(epoch), **{k: float(metrics[k]) for k in ("top1", "top5", "loss")}}


def top1_summary(history: Sequence[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """final, best (earliest epoch on ties), best_epoch, last5 (mean of the last <= 5) and
    last5_n (how many that mean covers) of top-1; None for an empty history."""
    if not history:
        return None
    top1 = [float(h["top1"]) for h in history]
    best = max(range(len(top1)), key=lambda i: (top1[i], -i))
    last = top1[-LAST_N:]
    return {"final": top1[-1], "best": top1[best], "best_epoch": int(history[best]["epoch"]),
            "last5": sum(last) / len(last), "last5_n": len(last)}


SUMMARY_HEADERS = ("best top1 % (epoch)", f"last{LAST_N} top1 % (n)")


def summary_cells(history: Sequence[Mapping[str, Any]]) -> tuple[str, str]:
    """The summary table's best and last-5 cells, '-' without a history (calibrate phases)."""
    s = top1_summary(history)
    if s is None:
        return "-", "-"
    return f"{s['best']:.2f} ({s['best_epoch']})", f"{s['last5']:.2f} ({s['last5_n']})"


def summary_record(kind: str, eval_metrics: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
                   settings: Optional[Mapping[str, Any]] = None, warnings: Sequence[str] = ()) -> dict:
    """A phase's entry of WORKDIR/summary.json: its results, `warnings` (e.g. divergence) and
    `settings` (run/record.py:phase_settings: precision, objective, epochs, batch size, record)."""
    return {"kind": kind, "eval": dict(eval_metrics), "top1": top1_summary(history),
            "eval_history": [dict(h) for h in history], "warnings": list(warnings), **dict(settings or {})}


def merge_summary(previous: Mapping[str, dict], current: Mapping[str, dict],
                  on_disk: Callable[[str], bool]) -> tuple[dict[str, dict], list[str]]:
    """summary.json's rows: this run's, plus those of an earlier summary for phases this run's
    phase_order leaves out whose checkpoints are still in the workdir (`on_disk(name)`), so a
    second config that runs a subset of the phases does not silently drop the others. A kept row
    says so: `"earlier_run": true`. Rows keep the earlier summary's order, new phases after them.
    Returns (rows, names of the kept rows)."""
    rows: dict[str, dict] = {}
    kept = []
    for name, row in previous.items():
        if name in current:
            rows[name] = current[name]
        elif on_disk(name):
            rows[name] = {**row, "earlier_run": True}
            kept.append(name)
    rows.update({name: row for name, row in current.items() if name not in rows})
    return rows, kept
