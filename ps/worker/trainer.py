"""The worker's training loop: pull, forward/backward, push, log. No gRPC here: it drives any
object with PSClient's `setup`, `pull`, `push` and `leave` methods."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ps.config import WorkerConfig
from ps.data import Datasets, accuracy, batches, shard_indices, steps_per_epoch
from ps.errors import InvalidArgument
from ps.models import model_loss
from ps.tp.binding import Binding, plain
from ps.tp.comm import all_reduce_max, broadcast_

log = logging.getLogger("ps.worker")


class Client(Protocol):
    mode: str
    versions: list[int]
    clock_floor: int

    def setup(self, tensors, optimizer) -> int: ...
    def pull(self, clock: int, observer: bool = False, names=None, into=None) -> dict[str, torch.Tensor]: ...
    def push(self, grads, clock: int) -> list[dict]: ...
    def push_pull(self, grads, clock: int, names=None, into=None) -> tuple[list[dict], dict]: ...
    def leave(self) -> None: ...
    def stats(self) -> list[dict]: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise InvalidArgument("device ('cuda') was asked for but torch sees no CUDA device")
    return torch.device(name)


def total_steps(cfg: WorkerConfig, train_size: int) -> int:
    if cfg.steps:
        return cfg.steps
    return math.ceil(cfg.epochs * steps_per_epoch(train_size, cfg.num_workers, cfg.batch_size))


class HostGrads:
    """Gradients on the host for the wire: pinned buffers filled asynchronously on CUDA,
    the gradients themselves on CPU."""


    def __init__(self, params: dict[str, nn.Parameter], device: torch.device):
        self.params = params
        self.buffers = (
            {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for n, p in params.items()}
            if device.type == "cuda" else None
        )

    def collect(self) -> dict[str, torch.Tensor]:
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in self.params.items()}
        if self.buffers is None:
            return grads
        for n, g in grads.items():
            self.buffers[n].copy_(g, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return self.buffers


class JsonlLog:
    """One JSON object per line, flushed per record (readable while training runs)."""

    def __init__(self, path: str | None):
        self._f = None
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self._f:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    test_accuracy: float | None
    wall_time: float


def _wait_for_everyone(client: Client, cfg: WorkerConfig, expected: int) -> None:
    """At a fresh start, wait (at most connect_timeout) until all workers have joined, so every
    mode starts its clock at the same moment (sync and ssp would wait anyway; async would not)."""
    deadline = time.monotonic() + cfg.connect_timeout
    while time.monotonic() < deadline:
        stats = client.stats()[0]
        if stats["active_workers"] + stats["evictions"] >= expected:
            return
        time.sleep(0.02)
    log.warning("not all %d workers joined within %.0fs; starting anyway", expected, cfg.connect_timeout)


def _into(binding: Binding) -> dict[str, torch.Tensor]:
    return {k: binding.params[k].data for k in binding.own}


def _pull(client: Client, clock: int, binding: Binding) -> None:
    """Pull this rank's parameters into place (straight into CPU fp32 parameters, with no extra
    copy); TP rank 0 then broadcasts the replicated ones to the group."""
    client.pull(clock, names=binding.own, into=_into(binding))
    broadcast_([binding.params[k].data for k in binding.replicated], binding.tp)


def _push_pull(client: Client, grads: dict[str, torch.Tensor], clock: int, binding: Binding) -> list[dict]:
    """Push this step's gradients and pull the next step's weights into place: one round trip
    per shard for small models."""
    results, _ = client.push_pull(grads, clock, names=binding.own, into=_into(binding))
    broadcast_([binding.params[k].data for k in binding.replicated], binding.tp)
    return results


def _forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batches: int) -> float:
    """Gradients of the batch's mean loss, accumulated over micro-batches; returns the loss."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    for xm, ym in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
        loss = model_loss(model, model(xm), ym) * (len(xm) / len(x))
        loss.backward()
        total += float(loss.detach())
    return total


def train(cfg: WorkerConfig, client: Client, model: nn.Module, data: Datasets,
          on_step: Callable[[dict], None] | None = None, binding: Binding | None = None) -> TrainResult:
    """Train `model` against the servers behind `client`; returns the final metrics. With a
    tensor-parallel `binding`, every rank of the group calls this together."""
    device = resolve_device(cfg.device)
    model.to(device).train()
    binding = binding or plain(model)
    tp = binding.tp
    steps = total_steps(cfg, len(data.train))
    start = all_reduce_max(client.setup(binding.init, cfg.optimizer), tp)
    if start == 0:
        _wait_for_everyone(client, cfg, cfg.num_workers * tp.size)
    stream = batches(data.train, shard_indices(len(data.train), cfg.rank, cfg.num_workers),
                     cfg.batch_size, cfg.seed * 1_000_003 + cfg.rank)
    host = HostGrads({k: binding.params[k] for k in binding.own}, device)
    metrics = JsonlLog(os.path.join(cfg.log_dir, f"{cfg.worker_id}.jsonl") if cfg.log_dir and tp.rank == 0 else None)
    t0, loss_value = time.monotonic(), float("nan")
    clock = start
    try:
        _pull(client, clock, binding)
        while clock < steps:
            if clock == cfg.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die as a crashed machine would
            # A worker that had to register again (evicted, then back) resumes where the servers
            # let it; in sync mode a late worker (backup workers) skips to the current step. The
            # ranks of a TP group agree on one clock.
            clock = max(clock, client.clock_floor, min(client.versions) if client.mode == "sync" else 0)
            clock = all_reduce_max(clock, tp)
            if clock >= steps:
                break
            work_start = time.perf_counter()
            x, y = next(stream)
            loss_value = _forward_backward(model, x.to(device), y.to(device), cfg.micro_batches)
            results = _push_pull(client, host.collect(), clock, binding)  # the weights for clock + 1
            if cfg.straggler > 1:
                time.sleep((cfg.straggler - 1) * (time.perf_counter() - work_start))
            record = {"worker": cfg.worker_id, "step": clock, "time": time.monotonic() - t0, "loss": loss_value,
                      "staleness": max(r["staleness"] for r in results)}
            if cfg.eval_every and data.test is not None and (clock % cfg.eval_every == 0 or clock == steps - 1):
                record["test_accuracy"] = accuracy(model, data.test, device)
            metrics.write(record)
            if on_step and tp.rank == 0:
                on_step({**record, "steps": steps})
            clock += 1
        if clock != steps:  # the loop did not end by pulling the weights after the last step
            _pull(client, steps, binding)
        acc = accuracy(model, data.test, device) if data.test is not None else None
        result = TrainResult(steps, loss_value, acc, time.monotonic() - t0)
        metrics.write({"worker": cfg.worker_id, "final": True, "step": steps, "time": result.wall_time,
                       "loss": loss_value, "test_accuracy": acc})
        return result
    finally:
        metrics.close()
        try:
            client.leave()
        except Exception as e:  # noqa: BLE001 - leaving is best effort; the lease expires anyway
            log.warning("leave failed: %s", e)
