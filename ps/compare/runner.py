"""Run one configuration on a fresh local cluster and record its convergence curve.

Parameter-server runs are sampled from outside: an observer reads the servers' weights every
`eval_interval` seconds and evaluates them (test accuracy and loss, and AUC and log-loss for a
binary model; rows of server-held embedding tables are read as an observer, without waiting), so
every mode is measured the same way. The all-reduce baseline is evaluated by its rank 0 every few
steps. Time 0 is when all workers have joined (parameter server) or passed the start barrier
(all-reduce). Each run's final weights are saved in its log directory, for the report to compare
runs weight by weight."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Callable

from safetensors.torch import save_file

from ps.baselines.allreduce import FINAL_WEIGHTS
from ps.compare.spec import CompareConfig, RunSpec
from ps.cli.launch import Observer, Proc, start_servers, start_worker, stop_all, supervise
from ps.data import load_data, steps_per_epoch
from ps.embedding import server_tables
from ps.errors import InvalidArgument, PSError
from ps.models import build_model
from ps.tp.groups import free_port


@dataclass
class RunResult:
    spec: RunSpec
    error: str | None = None
    curve: list[dict] = field(default_factory=list)   # time, step, accuracy, loss (+ auc, logloss: binary)
    train_time: float = 0.0
    updates: int = 0
    bytes_moved: int = 0
    staleness: dict[int, int] = field(default_factory=dict)
    weights: str | None = None  # the final weights (safetensors, by parameter name)


def _argv(cfg: CompareConfig, rank: int, log_dir: str, ps: bool = True, spec: RunSpec | None = None) -> list[str]:
    argv = ["--rank", str(rank), "--model", cfg.model, "--data", cfg.data, "--batch-size", str(cfg.batch_size),
            "--steps", str(cfg.steps), "--epochs", str(cfg.epochs), "--seed", str(cfg.seed), "--device", cfg.device,
            "--optimizer", cfg.optimizer.name, "--lr", str(cfg.optimizer.lr), "--momentum", str(cfg.optimizer.momentum),
            "--weight-decay", str(cfg.optimizer.weight_decay), "--beta1", str(cfg.optimizer.beta1),
            "--beta2", str(cfg.optimizer.beta2), "--eps", str(cfg.optimizer.eps), "--log-dir", log_dir,
            "--partition-bytes", str(cfg.partition_bytes)]
    if ps and cfg.compress != "none":
        argv += ["--compress", cfg.compress]
    if spec is not None:
        argv += ["--push-early"] if spec.push_early else []
        argv += ["--prefetch"] if spec.prefetch else []
    if rank in cfg.stragglers:
        argv += ["--straggler", str(cfg.stragglers[rank])]
    if rank in cfg.kills:
        argv += ["--kill-at", str(cfg.kills[rank])]
    return argv


def _fresh(path: str) -> str:
    """An empty directory for one run's logs (a rerun into the same --out must not mix runs)."""
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def _may_die(cfg: CompareConfig) -> list[str]:
    return [f"worker-{w}" for w in cfg.kills]


def check_runs(cfg: CompareConfig) -> None:
    """Refuse configurations the model cannot run: all-reduce for a model with server-held
    embedding tables (they need the servers), +tables=MODE for a model without any."""
    data = load_data(cfg.data)
    tables = sorted(server_tables(build_model(cfg.model, data.input_shape, data.num_classes)))
    for spec in cfg.runs:
        if spec.mode == "allreduce" and tables:
            raise InvalidArgument(f"configuration ({spec.label!r}): model {cfg.model} keeps embedding tables "
                                  f"({', '.join(tables)}) on the servers, which all-reduce has none of; "
                                  "leave allreduce out of --modes")
        if spec.table_mode and not tables:
            raise InvalidArgument(f"configuration ({spec.label!r}): +tables applies to a model with server-held "
                                  f"embedding tables; model {cfg.model} has none")


def run_ps(spec: RunSpec, cfg: CompareConfig, log: IO[str], progress: Callable[[dict], None]) -> RunResult:
    result = RunResult(spec)
    log_dir = _fresh(os.path.join(cfg.out, "logs", spec.label))
    extra = ["--staleness-lr"] if spec.staleness_lr else []
    extra += ["--backup-workers", str(spec.backup)] if spec.backup else []
    extra += spec.server_flags()
    servers = start_servers(cfg.servers, spec.mode, cfg.workers, staleness=spec.staleness,
                            worker_timeout=cfg.worker_timeout, extra=extra, out=log)
    workers: list[Proc] = []
    observer: Observer | None = None
    stop = threading.Event()
    started = threading.Event()
    t0 = [0.0]

    def sample() -> tuple[list[dict], int]:
        """A curve point, stamped when the weights are read; returns the stats it was read with
        and the observer's own pulled bytes before this read (not training traffic)."""
        now, stats, pulled = time.monotonic() - t0[0], observer.client.stats(), observer.bytes_pulled
        metrics = observer.metrics()
        # sync: global steps; async and ssp: pushes per worker
        step = stats[0]["version"] if spec.mode == "sync" else stats[0]["pushes"] / cfg.workers
        point = {"time": now, "step": step, "version": stats[0]["version"], **metrics}
        result.curve.append(point)
        progress(point)
        return stats, pulled

    def monitor() -> None:
        while not stop.is_set():
            stats = observer.client.stats()
            if all(s["initialized"] for s in stats) and stats[0]["active_workers"] + stats[0]["evictions"] >= cfg.workers:
                break
            time.sleep(0.02)
        t0[0] = time.monotonic()
        started.set()
        while cfg.curves and not stop.is_set():
            next_at = time.monotonic() + cfg.eval_interval
            try:
                sample()
            except PSError as e:  # a sample missed (e.g. a server restarting) is not the run's end
                log.write(f"[compare] evaluation failed: {e}\n")
            stop.wait(max(0.0, next_at - time.monotonic()))

    try:
        observer = Observer([p.address for p in servers], cfg.model, cfg.data, cfg.seed, cfg.partition_bytes)
        addresses = ",".join(p.address for p in servers)
        for r in range(cfg.workers):
            workers.append(start_worker(f"worker-{r}", ["--servers", addresses, "--num-workers", str(cfg.workers),
                                                        "--no-progress", "--eval-every", "0", *_argv(cfg, r, log_dir, spec=spec)],
                                        log, local_rank=r))
        thread = threading.Thread(target=monitor, daemon=True)
        thread.start()
        result.error = supervise(workers, servers, cfg.timeout, may_die=_may_die(cfg))
        stop.set()
        thread.join()
        if started.is_set():
            result.train_time = time.monotonic() - t0[0]
            stats, observer_bytes = sample()
            result.updates = stats[0]["version"]
            result.bytes_moved = sum(s["bytes_pushed"] + s["bytes_pulled"] for s in stats) - observer_bytes
            result.staleness = dict(sum((Counter(s["staleness_histogram"]) for s in stats), Counter()))
            result.weights = os.path.join(log_dir, FINAL_WEIGHTS)
            save_file({n: t.contiguous() for n, t in observer.weights().items()}, result.weights)
        elif result.error is None:
            result.error = "training never started"
    finally:
        stop.set()
        if observer is not None:
            observer.close()
        stop_all(workers + servers)
    return result


def run_allreduce(spec: RunSpec, cfg: CompareConfig, log: IO[str], progress: Callable[[dict], None]) -> RunResult:
    result = RunResult(spec)
    log_dir = _fresh(os.path.join(cfg.out, "logs", spec.label))
    eval_every = max(1, _steps(cfg) // 40) if cfg.curves else 0
    port = free_port()
    workers = [start_worker(f"worker-{r}", ["--world-size", str(cfg.workers), "--master-port", str(port),
                                            "--eval-every", str(eval_every), *_argv(cfg, r, log_dir, ps=False)],
                            log, module="ps.baselines.allreduce", local_rank=r) for r in range(cfg.workers)]
    try:
        result.error = supervise(workers, [], cfg.timeout, may_die=_may_die(cfg))
        if result.error is None and cfg.kills:
            result.error = "a killed worker stops all-reduce"
    finally:
        stop_all(workers)
    path = os.path.join(log_dir, "worker-0.jsonl")
    records = [json.loads(line) for line in open(path, encoding="utf-8")] if os.path.exists(path) else []
    for r in records:
        if "test_accuracy" in r:
            point = {"time": r["time"], "step": r["step"] + 1, "version": r["step"] + 1,
                     "accuracy": r["test_accuracy"], "loss": r["test_loss"]}
            result.curve.append(point)
            progress(point)
    if records:
        result.train_time = records[-1]["time"]
        result.updates = records[-1]["step"] + 1
        # a ring all-reduce moves 2 (N - 1) / N of the model per worker per step
        model_bytes = _model_bytes(cfg)
        result.bytes_moved = int(2 * (cfg.workers - 1) * model_bytes * result.updates)
        result.staleness = {0: result.updates}
    weights = os.path.join(log_dir, FINAL_WEIGHTS)
    result.weights = weights if result.error is None and os.path.exists(weights) else None
    return result


def _steps(cfg: CompareConfig) -> int:
    if cfg.steps:
        return cfg.steps
    return math.ceil(cfg.epochs * steps_per_epoch(len(load_data(cfg.data).train), cfg.workers, cfg.batch_size))


def _model_bytes(cfg: CompareConfig) -> int:
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def run(spec: RunSpec, cfg: CompareConfig, log: IO[str], progress: Callable[[dict], None]) -> RunResult:
    runner = run_allreduce if spec.mode == "allreduce" else run_ps
    return runner(spec, cfg, log, progress)

