"""Summaries of comparison runs, and the files a comparison writes: report.md, convergence.png,
results.json and curves.csv."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Sequence

from safetensors.torch import load_file

from ps.compare.runner import RunResult
from ps.compare.spec import CompareConfig

COLUMNS = [
    ("config", "config"), ("status", "status"), ("time_to_target", "time to target (s)"),
    ("steps_to_target", "steps to target"), ("final_accuracy", "final accuracy"), ("final_loss", "final loss"),
    ("mean_staleness", "mean staleness"), ("max_staleness", "max staleness"), ("updates_per_s", "updates/s"),
    ("mb_moved", "MB moved"), ("train_time", "train time (s)"), ("weights_vs_allreduce", "max weight diff from allreduce"),
]
# A binary job (one logit per sample, e.g. dlrm-tiny on clicks) shows AUC and log-loss in place of the loss.
BINARY_COLUMNS = COLUMNS[:4] + [("final_auc", "final AUC"), ("final_logloss", "final logloss"),
                                ("final_accuracy", "final accuracy")] + COLUMNS[6:]


def reached(point: dict, cfg: CompareConfig) -> bool:
    """Whether a curve point meets every target given (none given: never)."""
    ok_acc = cfg.target_accuracy is None or point["accuracy"] >= cfg.target_accuracy
    ok_loss = cfg.target_loss is None or point["loss"] <= cfg.target_loss
    ok_auc = cfg.target_auc is None or point.get("auc", math.nan) >= cfg.target_auc  # NaN never reaches
    targets = (cfg.target_accuracy, cfg.target_loss, cfg.target_auc)
    return ok_acc and ok_loss and ok_auc and any(t is not None for t in targets)


def is_binary(rows: Sequence[dict]) -> bool:
    """Whether the summaries are of a binary job (some run measured an AUC)."""
    return any(r.get("final_auc") is not None for r in rows)


def summarize(result: RunResult, cfg: CompareConfig) -> dict:
    first = next((p for p in result.curve if reached(p, cfg)), None)
    last = result.curve[-1] if result.curve else None
    total = sum(result.staleness.values())
    return {
        "config": result.spec.label,
        "status": "ok" if result.error is None else f"failed: {result.error}",
        "time_to_target": first["time"] if first else None,
        "steps_to_target": first["step"] if first else None,
        "final_accuracy": last["accuracy"] if last else None,
        "final_loss": last["loss"] if last else None,
        "final_auc": last.get("auc") if last else None,
        "final_logloss": last.get("logloss") if last else None,
        "mean_staleness": sum(k * v for k, v in result.staleness.items()) / total if total else None,
        "max_staleness": max((k for k, v in result.staleness.items() if v), default=None),
        "updates_per_s": result.updates / result.train_time if result.train_time else None,
        "mb_moved": result.bytes_moved / 1e6,
        "train_time": result.train_time,
        "weights_vs_allreduce": None,
    }


def weight_gap(a: str, b: str) -> float:
    """The largest absolute difference between two runs' final weights (every parameter)."""
    wa, wb = load_file(a), load_file(b)
    if wa.keys() != wb.keys() or any(wa[n].shape != wb[n].shape for n in wa):
        raise ValueError(f"{a} and {b} hold different parameters")
    return max(float((wa[n].double() - wb[n].double()).abs().max()) for n in wa)


def compare_weights(results: Sequence[RunResult], rows: Sequence[dict]) -> None:
    """Fill each row's largest weight difference from the all-reduce run's final weights."""
    base = next((r.weights for r in results if r.spec.mode == "allreduce" and r.weights), None)
    if base is None:
        return
    for result, row in zip(results, rows):
        if result.weights:
            row["weights_vs_allreduce"] = weight_gap(result.weights, base)


TINY = ("final_loss", "final_logloss", "weights_vs_allreduce")  # columns whose values below 1e-3 still say something
# (a time or a step count that small is just the first sample: 0.0000)


def _fmt(value, key: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if key in TINY and value and abs(value) < 1e-3:  # a weight gap is 0 exactly when equal
            return f"{value:.1e}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(rows: Sequence[dict]) -> str:
    columns = BINARY_COLUMNS if is_binary(rows) else COLUMNS
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join(" --- " for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(key), key) for key, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def describe(cfg: CompareConfig) -> str:
    faults = [f"worker {w} {f:g}x slower" for w, f in sorted(cfg.stragglers.items())]
    faults += [f"worker {w} killed at step {s}" for w, s in sorted(cfg.kills.items())]
    target = " and ".join(x for x in (
        f"test accuracy >= {cfg.target_accuracy}" if cfg.target_accuracy is not None else "",
        f"test loss <= {cfg.target_loss}" if cfg.target_loss is not None else "",
        f"test AUC >= {cfg.target_auc}" if cfg.target_auc is not None else "") if x) or "none"
    length = f"{cfg.steps} steps" if cfg.steps else f"{cfg.epochs:g} epochs"
    return (f"{cfg.workers} workers, {cfg.servers} servers; model {cfg.model} on {cfg.data}; batch {cfg.batch_size} "
            f"per worker, {length}; optimizer {cfg.optimizer.name} lr {cfg.optimizer.lr:g}; seed {cfg.seed}; "
            f"faults: {', '.join(faults) or 'none'}; target: {target}.")


def plot(results: Sequence[RunResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    binary = any("auc" in p for r in results for p in r.curve)
    keys = ("auc", "loss") if binary else ("accuracy", "loss")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for r in results:
        if not r.curve:
            continue
        for row, key in enumerate(keys):
            for col, x in enumerate(("time", "step")):
                axes[row][col].plot([p[x] for p in r.curve], [p.get(key, math.nan) for p in r.curve],
                                    label=r.spec.label)
    for row, key in enumerate(("test AUC" if binary else "test accuracy", "test loss")):
        for col, x in enumerate(("wall-clock time (s)", "steps (pushes per worker)")):
            ax = axes[row][col]
            ax.set_xlabel(x)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
    axes[1][0].set_yscale("log")
    axes[1][1].set_yscale("log")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: Sequence[RunResult], cfg: CompareConfig) -> list[dict]:
    """Write every output file into cfg.out; returns the summary rows."""
    os.makedirs(cfg.out, exist_ok=True)
    rows = [summarize(r, cfg) for r in results]
    compare_weights(results, rows)
    with open(os.path.join(cfg.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"config": dataclasses.asdict(cfg), "summary": rows,
                   "runs": [{"config": r.spec.label, "error": r.error, "curve": r.curve,
                             "train_time": r.train_time, "updates": r.updates, "bytes_moved": r.bytes_moved,
                             "staleness_histogram": {str(k): v for k, v in sorted(r.staleness.items())},
                             "final_weights": os.path.relpath(r.weights, cfg.out) if r.weights else None}
                            for r in results]}, f, indent=1)
    binary = is_binary(rows)
    with open(os.path.join(cfg.out, "curves.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["config", "time", "step", "version", "accuracy", "loss"] + (["auc", "logloss"] if binary else []))
        for r in results:
            for p in r.curve:
                w.writerow([r.spec.label, p["time"], p["step"], p["version"], p["accuracy"], p["loss"]]
                           + ([p.get("auc", ""), p.get("logloss", "")] if binary else []))
    plot(results, os.path.join(cfg.out, "convergence.png"))
    with open(os.path.join(cfg.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(f"# Convergence comparison\n\n{describe(cfg)}\n\n{table(rows)}\n\n"
                "Time is wall-clock seconds from the moment all workers have joined. Steps are gradient pushes "
                "per worker (sync: global steps). Parameter-server curves are the servers' weights evaluated "
                "every interval by an observer; the all-reduce curve is evaluated by its rank 0. "
                "MB moved counts the gradient, weight and table-row bytes the workers moved (ids included; "
                "all-reduce: ring estimate). "
                "Max weight diff from allreduce is the largest absolute difference of any final weight from the "
                "all-reduce run's "
                "(0: the same weights to the bit).\n\n"
                "![convergence](convergence.png)\n")
    return rows
