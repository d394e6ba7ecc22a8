"""What a comparison runs: configurations parsed from `--modes`, fault injections, settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ps import compress
from ps.config import DEFAULT_PARTITION_BYTES, OptimizerConfig
from ps.errors import InvalidArgument

_ITEM = re.compile(r"^(sync|async|ssp|allreduce)(?::(\d+))?((?:\+[a-z-]+(?:=[a-z0-9:]+)?)*)$")
_TABLE_MODE = re.compile(r"^(sync|async)$|^ssp:(\d+)$")
_RULE = ("must look like sync, async, ssp:S or allreduce, optionally with +backup=B (sync), +slr or +prefetch "
         "(async, ssp), +early (not allreduce), +tables=MODE (not allreduce; MODE: sync, async or ssp:S)")


@dataclass(frozen=True)
class RunSpec:
    """One configuration: `sync`, `async`, `ssp:S`, `allreduce`, with options `+backup=B` (sync),
    `+slr` (staleness-aware learning rate, async and ssp), `+early` (push each gradient as
    backward produces it; any parameter-server mode), `+prefetch` (pull the next step's
    weights while computing; async and ssp) and `+tables=MODE` (server-held embedding tables
    in another mode than the dense parameters, MODE sync, async or ssp:S: the hybrid
    `sync+tables=async` is ps-server's `--mode sync --table-mode async`)."""

    label: str
    mode: str
    staleness: int = 0
    backup: int = 0
    staleness_lr: bool = False
    push_early: bool = False
    prefetch: bool = False
    table_mode: str = ""  # "": the tables follow `mode`
    table_staleness: int = -1  # the tables' ssp bound (-1: `staleness`)

    def server_flags(self) -> list[str]:
        """ps-server flags for this configuration's tables."""
        if not self.table_mode:
            return []
        flags = ["--table-mode", self.table_mode]
        return flags + (["--table-staleness", str(self.table_staleness)] if self.table_mode == "ssp" else [])


def _table_mode(item: str, mode: str, staleness: int, value: str) -> tuple[str, int]:
    """(table mode, table bound) of a `+tables=MODE` option."""
    m = _TABLE_MODE.match(value)
    if not m:
        raise InvalidArgument(f"configuration ({item!r}): option +tables={value} must name the tables' mode: "
                              "tables=sync, tables=async or tables=ssp:S")
    table_mode, bound = ("ssp", int(m.group(2))) if m.group(2) is not None else (m.group(1), -1)
    if table_mode == mode and (mode != "ssp" or bound == staleness):
        raise InvalidArgument(f"configuration ({item!r}): option +tables={value} is the dense mode already; "
                              "name another mode for the tables (e.g. sync+tables=async) or leave it out")
    return table_mode, bound


def _misfit(name: str, value: str, mode: str, given: set[str]) -> str:
    """Why an option was refused."""
    if name == "tables" and mode != "allreduce":
        return ("is given twice: the tables have one mode" if name in given else
                "needs the tables' mode: tables=sync, tables=async or tables=ssp:S")
    if name == "backup" and mode == "sync":
        return "needs a whole number of backup workers, e.g. +backup=1"
    return f"does not apply to {mode}"


def parse_runs(text: str, num_workers: int) -> list[RunSpec]:
    runs: list[RunSpec] = []
    for item in (x.strip() for x in text.split(",")):
        m = _ITEM.match(item)
        if not m:
            raise InvalidArgument(f"configuration ({item!r}) {_RULE}")
        mode, staleness, opts = m.group(1), m.group(2), m.group(3)
        if mode == "ssp" and staleness is None:
            raise InvalidArgument(f"configuration ({item!r}): ssp needs its bound, e.g. ssp:2")
        if mode != "ssp" and staleness is not None:
            raise InvalidArgument(f"configuration ({item!r}): only ssp takes a bound")
        backup, flags, tables = 0, set(), ("", -1)
        for opt in filter(None, opts.split("+")):
            name, _, value = opt.partition("=")
            if name == "backup" and value.isdigit() and mode == "sync":
                backup = int(value)
            elif name == "tables" and value and mode != "allreduce" and name not in flags:
                flags.add(name)
                tables = _table_mode(item, mode, int(staleness or 0), value)
            elif name in ("slr", "prefetch") and not value and mode in ("async", "ssp") and name not in flags:
                flags.add(name)
            elif name == "early" and not value and mode != "allreduce" and name not in flags:
                flags.add(name)
            else:
                raise InvalidArgument(f"configuration ({item!r}): option +{opt} {_misfit(name, value, mode, flags)}")
        if backup >= num_workers:
            raise InvalidArgument(f"configuration ({item!r}): backup ({backup}) must be < workers ({num_workers})")
        runs.append(RunSpec(item, mode, int(staleness or 0), backup, "slr" in flags, "early" in flags,
                            "prefetch" in flags, *tables))
    if len({r.label for r in runs}) != len(runs):
        raise InvalidArgument(f"configurations ({text!r}) must not repeat")
    return runs


def parse_faults(items: list[str], what: str, num_workers: int, cast) -> dict[int, float]:
    """`WORKER:VALUE` items (e.g. --straggler 3:4) into {worker: value}."""
    out: dict[int, float] = {}
    for item in items:
        worker, sep, value = item.partition(":")
        try:
            w, v = int(worker), cast(value)
        except ValueError:
            raise InvalidArgument(f"{what} ({item!r}) must look like WORKER:VALUE, e.g. 3:4") from None
        if not sep or not 0 <= w < num_workers:
            raise InvalidArgument(f"{what} ({item!r}): worker must be in [0, {num_workers})")
        out[w] = v
    return out


@dataclass(frozen=True)
class CompareConfig:
    runs: tuple[RunSpec, ...]
    workers: int = 4
    servers: int = 2
    model: str = "mlp"
    data: str = "digits"
    batch_size: int = 32
    steps: int = 0
    epochs: float = 20.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    seed: int = 0
    stragglers: dict[int, float] = field(default_factory=dict)
    kills: dict[int, int] = field(default_factory=dict)
    target_accuracy: float | None = None
    target_loss: float | None = None
    target_auc: float | None = None
    eval_interval: float = 0.25
    # Learning curves sampled during training (the observer's evaluations, all-reduce rank 0's):
    # False leaves the training's processes alone until the end (throughput benchmarks).
    curves: bool = True
    worker_timeout: float = 5.0
    timeout: float = 900.0
    partition_bytes: int = DEFAULT_PARTITION_BYTES
    device: str = "cpu"
    compress: str = "none"
    out: str = "runs/compare"

    def __post_init__(self) -> None:
        if not self.runs:
            raise InvalidArgument("modes must name at least one configuration")
        compress.parse(self.compress)
        if self.workers < 1 or self.servers < 1:
            raise InvalidArgument(f"workers ({self.workers}) and servers ({self.servers}) must be >= 1")
        if self.steps <= 0 and self.epochs <= 0:
            raise InvalidArgument("one of steps or epochs must be > 0")
        if self.eval_interval <= 0:
            raise InvalidArgument(f"eval_interval ({self.eval_interval}) must be > 0")
        if any(f < 1 for f in self.stragglers.values()):
            raise InvalidArgument(f"straggler factors ({self.stragglers}) must be >= 1")
        if any(s < 0 for s in self.kills.values()):
            raise InvalidArgument(f"kill steps ({self.kills}) must be >= 0")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise InvalidArgument(f"target_accuracy ({self.target_accuracy}) must be in (0, 1]")
        if self.target_auc is not None and not 0.5 < self.target_auc <= 1:
            raise InvalidArgument(f"target_auc ({self.target_auc}) must be in (0.5, 1]")
