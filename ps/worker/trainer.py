"""The worker's training loop: pull, forward/backward, push, log. No gRPC here: it drives any
object with PSClient's `setup`, `pull`, `push` and `leave` methods."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import statistics
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from ps.config import WorkerConfig
from ps.data import Datasets, loader, shard_indices, steps_per_epoch, test_metrics
from ps.embedding import TableGroup
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
    def hold(self, weights) -> None: ...
    def pull(self, clock: int, observer: bool = False, names=None, into=None) -> dict[str, torch.Tensor]: ...
    def push(self, grads, clock: int) -> list[dict]: ...
    def push_pull(self, grads, clock: int, names=None, into=None) -> tuple[list[dict], dict]: ...
    def push_stream(self, clock: int, dtypes): ...
    def prefetch(self, clock: int, names=None): ...
    def leave(self) -> None: ...
    def stats(self) -> list[dict]: ...
    def init_tables(self, specs) -> str: ...
    def pull_rows(self, clock, ids) -> dict[str, torch.Tensor]: ...
    def pull_rows_async(self, clock, ids): ...
    def push_rows(self, clock: int, grads) -> list[dict]: ...


def local_index(rank: int = 0) -> int:
    """This process's index among the workers on its host: LOCAL_RANK (set by ps-launch, torchrun
    and the deploy files), else the worker's rank."""
    raw = os.environ.get("LOCAL_RANK", "")
    try:
        return int(raw) if raw.strip() else rank
    except ValueError:
        raise InvalidArgument(f"LOCAL_RANK ({raw!r}) must be an integer") from None


def resolve_device(name: str, rank: int = 0) -> torch.device:
    """The device a worker trains on. CUDA: GPU local_index(rank) mod the device count, so the
    workers of a host each get their own GPU (and share them round-robin when there are more)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InvalidArgument("device ('cuda') was asked for but torch sees no CUDA device")
        device = torch.device("cuda", local_index(rank) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device(name)


def total_steps(cfg: WorkerConfig, train_size: int) -> int:
    if cfg.steps:
        return cfg.steps
    return math.ceil(cfg.epochs * steps_per_epoch(train_size, cfg.num_workers, cfg.batch_size))


class HostGrads:
    """Gradients on the host for the wire: pinned buffers filled asynchronously on CUDA,
    the gradients themselves on CPU. A parameter that got no gradient maps to None (the servers
    do not step it, as torch.optim skips it)."""

    def __init__(self, params: dict[str, nn.Parameter], device: torch.device):
        self.params = params
        self.buffers = (
            {n: torch.empty(p.shape, dtype=p.dtype, pin_memory=True) for n, p in params.items()}
            if device.type == "cuda" else None
        )

    def collect(self) -> dict[str, torch.Tensor | None]:
        grads = {n: p.grad for n, p in self.params.items()}
        if self.buffers is None:
            return grads
        for n, g in grads.items():
            if g is not None:
                self.buffers[n].copy_(g, non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return {n: self.buffers[n] if g is not None else None for n, g in grads.items()}


class EarlyPush:
    """Pushes each parameter's gradient the moment backward has produced it, so sending overlaps
    the rest of backward (as BytePS and Poseidon's wait-free backpropagation do): a hook on every
    parameter, armed during the step's last backward (micro-batches accumulate before it).
    On CUDA each gradient is copied to a pinned host buffer on the stream and handed over once
    the copy has completed, by a thread of its own, so backward never waits for the host. What
    was handed over is tracked here, when it is handed (not when the stream has it: a copy may
    still be in flight), so no gradient is sent twice."""

    def __init__(self, client: Client, host: HostGrads):
        self.client, self.params, self.buffers = client, host.params, host.buffers
        self.dtypes = {n: p.dtype for n, p in self.params.items()}
        self.cuda = self.buffers is not None
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ps-early-push") if self.cuda else None
        self._copies: list[Future] = []
        self._handed: set[str] = set()  # this step's parameters whose gradient was handed over
        self.stream = None
        self.armed = False
        self._handles = [p.register_post_accumulate_grad_hook(self._hook(n)) for n, p in self.params.items()]

    def _hook(self, name: str) -> Callable[[nn.Parameter], None]:
        def hook(p: nn.Parameter) -> None:
            if self.armed and self.stream is not None and p.grad is not None:
                self._send(name, p.grad)
        return hook

    def _send(self, name: str, grad: torch.Tensor) -> None:
        self._handed.add(name)
        if not self.cuda:
            self.stream.add(name, grad)
            return
        buf = self.buffers[name]
        buf.copy_(grad, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        stream = self.stream
        self._copies.append(self._copier.submit(lambda: (done.synchronize(), stream.add(name, buf))))

    def begin(self, clock: int) -> None:
        self.stream, self.armed = self.client.push_stream(clock, self.dtypes), False
        self._handed = set()

    def arm(self) -> None:
        self.armed = True

    def finish(self) -> list[dict]:
        """Wait for the step's push; per-shard results. A parameter the last micro-batch gave no
        gradient goes with what earlier ones accumulated, or as having none if none did."""
        self.armed = False
        for name, p in self.params.items():
            if p.grad is not None and name not in self._handed:
                self._send(name, p.grad)
        copies, self._copies = self._copies, []
        for f in copies:
            f.result()
        stream, self.stream = self.stream, None
        return stream.finish()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        if self._copier is not None:
            self._copier.shutdown(wait=True)


class Straggler:
    """Fault injection: each step takes `factor` times as long, as on a slower machine. After a
    step it sleeps (factor - 1) times the median of the last 20 steps' times, this one included
    (not this step's time alone: a stall, such as a partition, is not slept again). Sleeping
    uses no CPU."""

    def __init__(self, factor: float):
        self.factor = factor
        self.recent: deque[float] = deque(maxlen=20)

    def after_step(self, seconds: float) -> None:
        if self.factor > 1:
            self.recent.append(seconds)
            time.sleep((self.factor - 1) * statistics.median(self.recent))


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
    test_auc: float | None = None  # binary models (one logit per sample)


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


def _install(ahead, binding: Binding) -> None:
    """Put prefetched weights in place (TP rank 0 then broadcasts the replicated ones)."""
    ahead.install(_into(binding))
    broadcast_([binding.params[k].data for k in binding.replicated], binding.tp)


def _push_pull(client: Client, grads: dict[str, torch.Tensor], clock: int, binding: Binding) -> list[dict]:
    """Push this step's gradients and pull the next step's weights into place: one round trip
    per shard for small models."""
    results, _ = client.push_pull(grads, clock, names=binding.own, into=_into(binding))
    broadcast_([binding.params[k].data for k in binding.replicated], binding.tp)
    return results


def _forward_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro_batches: int,
                      before_last_backward: Callable[[], None] | None = None) -> float:
    """Gradients of the batch's mean loss, accumulated over micro-batches; returns the loss."""
    model.zero_grad(set_to_none=True)
    total = 0.0
    chunks = list(zip(x.chunk(micro_batches), y.chunk(micro_batches)))
    for i, (xm, ym) in enumerate(chunks):
        loss = model_loss(model, model(xm), ym) * (len(xm) / len(x))
        if before_last_backward is not None and i == len(chunks) - 1:
            before_last_backward()
        loss.backward()
        total += float(loss.detach())
    return total


def train(cfg: WorkerConfig, client: Client, model: nn.Module, data: Datasets,
          on_step: Callable[[dict], None] | None = None, binding: Binding | None = None) -> TrainResult:
    """Train `model` against the servers behind `client`; returns the final metrics. With a
    tensor-parallel `binding`, every rank of the group calls this together."""
    device = resolve_device(cfg.device, cfg.rank)
    model.to(device).train()
    binding = binding or plain(model)
    tp = binding.tp
    steps = total_steps(cfg, len(data.train))
    start = all_reduce_max(client.setup(binding.init, cfg.optimizer), tp)
    tables = TableGroup(model, client)  # the model's server-held embedding tables (ps.embedding)
    if tables and tp.size > 1:
        raise InvalidArgument(f"server-held tables ({sorted(tables.tables)}) need tp 1: a tensor-parallel group's "
                              "ranks would each push the rows' gradients")
    tables.setup()
    # A model that says which ids a batch reads (`table_ids(x) -> {table: ids}`) gets the next
    # batch's rows prefetched while this step's dense push and pull are in flight.
    table_ids = getattr(model, "table_ids", None) if tables else None
    lookahead = None  # the next step's batch, read ahead for that
    if start == 0:
        _wait_for_everyone(client, cfg, cfg.num_workers)
    # A DataLoader over this worker's shard (its own sampler: the same batches in every mode),
    # pinned host batches on CUDA so they are copied to the GPU without a staging copy.
    stream = loader(data.train, shard_indices(len(data.train), cfg.rank, cfg.num_workers), cfg.batch_size,
                    cfg.seed * 1_000_003 + cfg.rank, workers=cfg.loader_workers, pin_memory=device.type == "cuda")
    own = {k: binding.params[k] for k in binding.own}
    host = HostGrads(own, device)  # its pinned buffers serve either way of pushing
    early = EarlyPush(client, host) if cfg.push_early else None
    metrics = JsonlLog(os.path.join(cfg.log_dir, f"{cfg.worker_id}.jsonl") if cfg.log_dir and tp.rank == 0 else None)
    t0, loss_value = time.monotonic(), float("nan")
    clock = start
    straggler = Straggler(cfg.straggler)
    ahead, ahead_clock = None, -1  # weights being prefetched, and their clock
    evicted = False  # the last push came back EVICTED
    stepped = False  # this process ran at least one step
    try:
        if cfg.prefetch and client.mode == "sync":
            raise InvalidArgument("prefetch needs async or ssp mode: in sync mode the next step's weights exist "
                                  "only once every worker has pushed this step")
        _pull(client, clock, binding)
        pulled = clock  # the clock whose weights the parameters hold
        # From now on the parameters hold the servers' weights (at the versions the client read): a
        # shard that restarts empty (no checkpoint) is initialised again from them.
        client.hold({k: binding.params[k] for k in binding.own})
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
            if ahead is not None:  # the weights prefetched during the last step, or fresh ones if the clock moved
                if ahead_clock == clock and not evicted:
                    _install(ahead, binding)
                else:
                    ahead.cancel()
                    _pull(client, clock, binding)
                ahead = None
            elif evicted:  # the last push was not applied and no weights came back: fresh ones
                _pull(client, clock, binding)
            pulled = clock
            if cfg.prefetch and clock + 1 < steps:  # pulled while this step computes (one step staler)
                ahead, ahead_clock = client.prefetch(clock + 1, names=binding.own), clock + 1
            x, y = lookahead if lookahead is not None else next(stream)
            lookahead = None
            tables.begin(clock)
            if early is not None:
                early.begin(clock)
            loss_value = _forward_backward(model, x.to(device, non_blocking=True), y.to(device, non_blocking=True),
                                           cfg.micro_batches,
                                           early.arm if early is not None else None)
            stepped = True
            table_results = tables.push(clock)  # before the dense push: a sync step's rows are in when it completes
            if table_ids is not None and clock + 1 < steps:  # the next batch's rows, read during the dense push
                lookahead = next(stream)
                tables.prefetch(table_ids(lookahead[0]), clock + 1)
            if early is None and not cfg.prefetch:
                results = _push_pull(client, host.collect(), clock, binding)  # the weights for clock + 1
            else:
                results = early.finish() if early is not None else client.push(host.collect(), clock)
            # EVICTED: the servers re-placed this worker and did not apply the push; the next
            # step starts from client.clock_floor with fresh weights (every TP rank agrees).
            evicted = bool(all_reduce_max(int(any(r["outcome"] == "EVICTED" for r in results)), tp))
            if early is not None and not cfg.prefetch and not evicted:
                _pull(client, clock + 1, binding)
            if not cfg.prefetch and not evicted:
                pulled = clock + 1
            straggler.after_step(time.perf_counter() - work_start)
            record = {"worker": cfg.worker_id, "step": clock, "time": time.monotonic() - t0, "loss": loss_value,
                      "staleness": max(r["staleness"] for r in results + table_results)}
            if cfg.eval_every and data.test is not None and (clock % cfg.eval_every == 0 or clock == steps - 1):
                record.update(test_metrics(model, data.test, device))  # test_accuracy (+ test_auc, test_logloss)
            metrics.write(record)
            if on_step and tp.rank == 0:
                on_step({**record, "steps": steps})
            clock += 1
        if ahead is not None:
            ahead.cancel()
            ahead = None
        if pulled != steps:  # the weights after the last step are not in place yet
            _pull(client, steps, binding)
        if not stepped:  # no step was left to run (the job had finished): the weights' loss
            log.info("%s: the servers are past step %d already; nothing left to train", cfg.worker_id, steps)
            model.eval()
            with torch.no_grad():
                x, y = next(stream)
                loss_value = float(model_loss(model, model(x.to(device)), y.to(device)))
            model.train()
        final = test_metrics(model, data.test, device) if data.test is not None else {"test_accuracy": None}
        acc = final["test_accuracy"]
        result = TrainResult(steps, loss_value, acc, time.monotonic() - t0, final.get("test_auc"))
        metrics.write({"worker": cfg.worker_id, "final": True, "step": steps, "time": result.wall_time,
                       "loss": loss_value, **final})
        all_reduce_max(0, tp)  # a TP group's ranks are all done with the servers before it leaves
        return result
    finally:
        metrics.close()
        if ahead is not None:  # an error mid-step: the prefetch must end before this worker leaves
            ahead.cancel()
        if early is not None:
            early.close()
        if tp.rank == 0:  # a TP group is one worker at the servers: it leaves once
            try:
                client.leave()
            except Exception as e:  # noqa: BLE001 - leaving is best effort; the lease expires anyway
                log.warning("leave failed: %s", e)
