"""What a comparison runs: configurations parsed from `--modes`, fault injections, settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ps import compress
from ps.config import DEFAULT_PARTITION_BYTES, OptimizerConfig
from ps.errors import InvalidArgument

_ITEM = re.compile(r"^(sync|async|ssp|allreduce)(?::(\d+))?((?:\+[a-z-]+(?:=\d+)?)*)$")


@dataclass(frozen=True)
class RunSpec:
    """One configuration: `sync`, `async`, `ssp:S`, `allreduce`, with options `+backup=B` (sync),
    `+slr` (staleness-aware learning rate, async and ssp), `+early` (push each gradient as
    backward produces it; any parameter-server mode) and `+prefetch` (pull the next step's
    weights while computing; async and ssp)."""

    label: str
    mode: str
    staleness: int = 0
    backup: int = 0
    staleness_lr: bool = False
    push_early: bool = False
    prefetch: bool = False


def parse_runs(text: str, num_workers: int) -> list[RunSpec]:
    runs: list[RunSpec] = []
    for item in (x.strip() for x in text.split(",")):
        m = _ITEM.match(item)
        if not m:
            raise InvalidArgument(
                f"configuration ({item!r}) must look like sync, async, ssp:S or allreduce, optionally with "
                "+backup=B (sync), +slr or +prefetch (async, ssp), +early (not allreduce)")
        mode, staleness, opts = m.group(1), m.group(2), m.group(3)
        if mode == "ssp" and staleness is None:
            raise InvalidArgument(f"configuration ({item!r}): ssp needs its bound, e.g. ssp:2")
        if mode != "ssp" and staleness is not None:
            raise InvalidArgument(f"configuration ({item!r}): only ssp takes a bound")
        backup, flags = 0, set()
        for opt in filter(None, opts.split("+")):
            name, _, value = opt.partition("=")
            if name == "backup" and value and mode == "sync":
                backup = int(value)
            elif name in ("slr", "prefetch") and not value and mode in ("async", "ssp") and name not in flags:
                flags.add(name)
            elif name == "early" and not value and mode != "allreduce" and name not in flags:
                flags.add(name)
            else:
                raise InvalidArgument(f"configuration ({item!r}): option +{opt} does not apply to {mode}")
        if backup >= num_workers:
            raise InvalidArgument(f"configuration ({item!r}): backup ({backup}) must be < workers ({num_workers})")
        runs.append(RunSpec(item, mode, int(staleness or 0), backup, "slr" in flags, "early" in flags,
                            "prefetch" in flags))
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
