"""One server shard's state machine: membership, clocks, pending pushes, versions, stats.

Every public method is thread-safe (one lock and one condition per shard) and free of gRPC:
the servicer decodes a request, calls one method here, and encodes the result.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ps.config import OptimizerConfig, ServerConfig
from ps.errors import (Cancelled, InvalidArgument, NotInitialized, PlanMismatch, PSError, StepConflict, Unavailable,
                       UnknownWorker)
from ps.server.checkpoint import Snapshot
from ps.server.policy import View, Verdict, make_policy
from ps.server.store import ParamStore
from ps.sharding import Plan

log = logging.getLogger("ps.server")

MAX_PARTS = 1 << 16
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds


@dataclass
class _Worker:
    clock: int


@dataclass
class _Pending:
    """Parts of one multi-request upload (a push or an init) not yet complete."""

    clock: int
    num_parts: int
    base_version: int = 0
    parts: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def merged(self, what: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for part in self.parts.values():
            for key, t in part.items():
                if key in out:
                    raise InvalidArgument(f"{what} key {key!r} appears in more than one part")
                out[key] = t
        return out


@dataclass(frozen=True)
class PushResult:
    outcome: str  # BUFFERED | APPLIED | ACCUMULATED | DUPLICATE | DROPPED
    version: int
    staleness: int = 0


class Shard:
    def __init__(self, cfg: ServerConfig, now: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.policy = make_policy(cfg.mode, cfg.staleness, cfg.backup_workers)
        self._now = now
        self._cond = threading.Condition(threading.Lock())
        self.store = ParamStore()
        self.plan: Plan | None = None
        self.optimizer_cfg: OptimizerConfig | None = None
        self.version = 0
        self._workers: dict[str, _Worker] = {}
        # Lease renewals are written outside the main lock, so a worker is never evicted for
        # waiting on a lock (single dict writes are atomic under the GIL).
        self._seen: dict[str, float] = {}
        self._departed: dict[str, int] = {}  # clocks of workers that left or were evicted
        self._wait_slice = min(0.5, cfg.worker_timeout / 4)
        self._ever: set[str] = set()
        self._pending_push: dict[str, _Pending] = {}
        self._pending_init: dict[str, _Pending] = {}
        self._step_pushes = 0  # pushes accumulated into the current sync step
        self.staleness_hist: Counter[int] = Counter()
        self.counters: Counter[str] = Counter()
        self._apply_counts = [0] * (len(APPLY_BUCKETS) + 1)  # the last one: above every bound
        self._apply_seconds = 0.0
        self._restored_workers: frozenset[str] = frozenset()  # ids in the checkpoint restored
        self._awaiting: set[str] = set()  # of those, the ones active then and not registered again yet
        self._awaiting_deadline = 0.0
        self._stopped = False

    # -- helpers (lock held) ------------------------------------------------------------------
    def _view(self) -> View:
        clocks = tuple(w.clock for w in self._workers.values())
        # After a restore, steps also wait for the workers the checkpoint had (until they are back,
        # or for one lease timeout): none may find a step done without its gradient.
        back = not self._awaiting or self._now() >= self._awaiting_deadline
        return View(self.version, clocks, len(self._ever) >= self.cfg.num_workers and back)

    def _check_plan(self, fingerprint: str) -> None:
        if self.plan is not None and fingerprint != self.plan.fingerprint:
            raise PlanMismatch(
                f"plan fingerprint {fingerprint!r} differs from this shard's {self.plan.fingerprint!r}: "
                "workers must use the same model, number of servers and partition size"
            )

    def _check_request(self, fingerprint: str, clock: int) -> None:
        """What every pull and push must satisfy before anything else is looked at."""
        if not self.store.initialized:
            raise NotInitialized(f"shard {self.cfg.shard_id} holds no parameters yet: call init first")
        self._check_plan(fingerprint)
        if clock < 0:
            raise InvalidArgument(f"clock ({clock}) must be >= 0")

    def _touch(self, worker_id: str) -> None:
        if worker_id:
            self._seen[worker_id] = self._now()

    def _worker(self, worker_id: str) -> _Worker:
        w = self._workers.get(worker_id)
        if w is None:
            raise UnknownWorker(f"worker {worker_id!r} is not registered (left or evicted): register again")
        self._touch(worker_id)
        return w

    def _maybe_complete_step(self) -> None:
        view = self._view()
        if self.policy.step_ready(view, self._step_pushes):
            with self._timed_apply():
                self.store.apply_accumulated()
            self._step_pushes = 0
            self.version += 1
            self.staleness_hist[0] += 1
            self._cond.notify_all()
        elif (self.policy.name == "sync" and self._step_pushes == 0 and view.quorum and view.clocks
              and all(c > view.version for c in view.clocks)):
            # Every active worker is past this step, yet none of its gradients is here: they were
            # lost with a server restart. Waiting would wait forever; the step is skipped instead.
            log.warning("shard %d: step %d has no gradient left (lost in a restart); skipping it",
                        self.cfg.shard_id, self.version)
            self.counters["lost_updates"] += 1
            self.store.clear_accumulated()
            self.version += 1
            self._cond.notify_all()

    def _remove(self, worker_id: str, left: bool) -> None:
        w = self._workers.pop(worker_id, None)
        self._seen.pop(worker_id, None)
        if w is not None:
            self._departed[worker_id] = w.clock
        if left:  # an evicted worker may come back and finish a push it had begun
            self._pending_push.pop(worker_id, None)
        self._pending_init.pop(worker_id, None)
        self._maybe_complete_step()
        self._cond.notify_all()

    def _catch_up(self, seen_version: int) -> None:
        """A worker the restored checkpoint knew has read version `seen_version` of this shard:
        above the restored version, it is how the shard learns how many updates it lost. It takes
        that version (sync: skips those steps) and counts them."""
        if seen_version > self.version and self.store.initialized:
            lost = seen_version - self.version
            log.warning("shard %d: a worker has seen version %d but the shard restored version %d: %d updates lost",
                        self.cfg.shard_id, seen_version, self.version, lost)
            self.counters["lost_updates"] += lost
            self.version = seen_version
            self.store.clear_accumulated()
            self._step_pushes = 0

    @contextlib.contextmanager
    def _timed_apply(self):
        t = time.perf_counter()
        yield
        took = time.perf_counter() - t
        self._apply_seconds += took
        self._apply_counts[bisect.bisect_left(APPLY_BUCKETS, took)] += 1

    def _reject(self, exc: Exception) -> None:
        self.counters["rejected"] += 1
        raise exc

    def reject(self, exc: Exception) -> None:
        """Count a request refused before it reached the shard (e.g. undecodable bytes) and raise."""
        with self._cond:
            self._reject(exc)

    # -- RPCs ---------------------------------------------------------------------------------
    def register(self, worker_id: str, fingerprint: str, clock: int = 0, seen_version: int = 0) -> dict:
        """Join (or rejoin, or renew); a `clock` above this worker's moves it up (a worker aligning
        itself across shards). A worker that comes back never gets a clock below the one it had,
        so its retried pushes stay duplicates. `seen_version`: see `_catch_up`."""
        if not worker_id:
            raise InvalidArgument("worker_id must be a non-empty string")
        if clock < 0 or seen_version < 0:
            raise InvalidArgument(f"clock ({clock}) and seen_version ({seen_version}) must be >= 0")
        with self._cond:
            self._check_plan(fingerprint)
            if worker_id in self._restored_workers:
                self._catch_up(seen_version)
            self._awaiting.discard(worker_id)
            w = self._workers.get(worker_id)
            if w is None:
                join = max(self.policy.join_clock(self._view()), self._departed.pop(worker_id, 0))
                w = self._workers[worker_id] = _Worker(join)
                self._ever.add(worker_id)
                log.info("shard %d: worker %s joined at clock %d", self.cfg.shard_id, worker_id, w.clock)
            if clock > w.clock:
                w.clock = clock
                self._maybe_complete_step()
            self._touch(worker_id)
            self._cond.notify_all()
            return {"initialized": self.store.initialized, "clock": w.clock, "version": self.version}

    def init(self, worker_id: str, plan: Plan, fingerprint: str, optimizer: OptimizerConfig,
             tensors: Sequence[tuple[str, torch.Tensor]], part: int, num_parts: int) -> bool:
        self._touch(worker_id if worker_id in self._workers else "")
        with self._cond:
            self._worker(worker_id)
            try:
                if plan.fingerprint != fingerprint:
                    raise PlanMismatch(f"plan fingerprint {fingerprint!r} does not match the plan sent ({plan.fingerprint!r})")
                if plan.num_shards != self.cfg.num_shards:
                    raise PlanMismatch(f"plan has {plan.num_shards} shards but this cluster has {self.cfg.num_shards}")
                self._check_plan(fingerprint)
                if self.store.initialized:
                    if optimizer != self.optimizer_cfg:
                        raise PlanMismatch(f"optimizer {optimizer} differs from the servers' {self.optimizer_cfg}")
                    return False
                _check_part(part, num_parts)
                expected = {s.key: s.length for s in plan.slices_for(self.cfg.shard_id)}
                values = _validate_slices(tensors, expected)
            except PSError as e:
                self._reject(e)
            pending = self._pending_init.get(worker_id)
            if pending is None or pending.num_parts != num_parts:
                pending = self._pending_init[worker_id] = _Pending(0, num_parts)
            pending.parts[part] = values
            if len(pending.parts) < num_parts:
                return False
            del self._pending_init[worker_id]
            merged = pending.merged("init")
            if set(merged) != set(expected):
                missing = sorted(set(expected) - set(merged))[:5]
                self._reject(InvalidArgument(f"init is missing slices of this shard, e.g. {missing}"))
            self.store.init(merged, optimizer)
            self._pending_init.clear()
            self.plan, self.optimizer_cfg = plan, optimizer
            log.info("shard %d: initialised %d slices (plan %s)", self.cfg.shard_id, len(merged), fingerprint)
            self._cond.notify_all()
            return True

    def pull(self, worker_id: str, fingerprint: str, clock: int, keys: Sequence[str],
             is_active: Callable[[], bool] = lambda: True, encode: Callable | None = None):
        """Raw fp32 bytes of the slices for `keys` once the policy allows a worker at `clock` to read; returns
        (slices, version, min_clock). An empty worker_id reads without waiting or joining.
        encode(views, version, min_clock): called instead under the lock with read-only views of the
        live slices (it must copy what it keeps: one copy, consistent across slices); returns its result."""
        self._touch(worker_id if worker_id in self._workers else "")
        with self._cond:
            try:
                self._check_request(fingerprint, clock)
                if len(set(keys)) != len(keys):
                    raise InvalidArgument("a pull names the same key more than once")
                self.store.check_keys(keys)
            except PSError as e:
                self._reject(e)
            if worker_id:
                self._worker(worker_id)
                while not self.policy.pull_ready(clock, self._view()):
                    if self._stopped:  # the client retries elsewhere or after the restart
                        raise Unavailable(f"shard {self.cfg.shard_id} is stopping")
                    if not is_active():
                        raise Cancelled("pull abandoned: the client went away")
                    self._cond.wait(self._wait_slice)
                    self._worker(worker_id)
            self.counters["pulls"] += 1
            slices = self.store.read(keys, copy=encode is None)
            self.counters["bytes_pulled"] += sum(len(data) for _, data in slices)
            if encode is not None:
                return encode(slices, self.version, self._view().min_clock)
            return slices, self.version, self._view().min_clock

    def push(self, worker_id: str, fingerprint: str, clock: int, base_version: int,
             grads: Sequence[tuple[str, torch.Tensor]], part: int, num_parts: int,
             wire_bytes: int | None = None) -> PushResult:
        """wire_bytes: what the gradients took on the wire (sparse ones less than dense), for stats."""
        self._touch(worker_id if worker_id in self._workers else "")
        with self._cond:
            try:
                self._check_request(fingerprint, clock)
                if base_version < 0:
                    raise InvalidArgument(f"base_version ({base_version}) must be >= 0")
                # A base ahead of the shard comes from updates a restored shard forgot: staleness 0.
                base_version = min(base_version, self.version)
                _check_part(part, num_parts)
                values = self.store.validate(grads)
            except PSError as e:
                self._reject(e)
            w = self._worker(worker_id)  # an unknown worker registers first (and may catch the shard up)
            if self.policy.on_push(clock, self._view()) is Verdict.AHEAD:
                self._reject(StepConflict(f"push for sync step {clock} but the shard is at step {self.version}"))
            if clock < w.clock:
                self.counters["duplicates"] += 1
                return PushResult("DUPLICATE", self.version)
            pending = self._pending_push.get(worker_id)
            if pending is not None and pending.clock == clock:
                if part in pending.parts:
                    self.counters["duplicates"] += 1
                    return PushResult("DUPLICATE", self.version)
                if pending.num_parts != num_parts:
                    self._reject(InvalidArgument(f"num_parts ({num_parts}) differs from earlier parts ({pending.num_parts})"))
            elif pending is not None and pending.clock > clock:
                self.counters["dropped"] += 1
                return PushResult("DROPPED", self.version)
            else:
                pending = self._pending_push[worker_id] = _Pending(clock, num_parts, base_version)
            pending.parts[part] = values
            pending.base_version = min(pending.base_version, base_version)
            self.counters["bytes_pushed"] += (sum(t.numel() * t.element_size() for _, t in grads)
                                              if wire_bytes is None else wire_bytes)
            if len(pending.parts) < num_parts:
                return PushResult("BUFFERED", self.version)
            del self._pending_push[worker_id]
            try:
                merged = pending.merged("gradient")
            except InvalidArgument as e:
                self._reject(e)
            return self._commit(w, clock, pending.base_version, merged)

    def _commit(self, w: _Worker, clock: int, base_version: int, grads: dict[str, torch.Tensor]) -> PushResult:
        verdict = self.policy.on_push(clock, self._view())
        if verdict is Verdict.LATE:
            w.clock = max(w.clock, clock + 1)
            self.counters["dropped"] += 1
            return PushResult("DROPPED", self.version)
        self.counters["pushes"] += 1
        w.clock = clock + 1
        if verdict is Verdict.ACCUMULATE:
            self.store.accumulate(grads)
            self._step_pushes += 1
            before = self.version
            self._maybe_complete_step()
            return PushResult("APPLIED" if self.version > before else "ACCUMULATED", self.version)
        if not grads:  # a push with no keys for this shard (a TP rank's) only moves the clock
            return PushResult("APPLIED", self.version)
        staleness = self.version - base_version
        with self._timed_apply():
            self.store.apply(grads, 1.0 / (1 + staleness) if self.cfg.staleness_lr else 1.0)
        self.version += 1
        self.staleness_hist[staleness] += 1
        self._cond.notify_all()
        return PushResult("APPLIED", self.version, staleness)

    def heartbeat(self, worker_id: str) -> None:
        """Renew the lease; needs no lock, so it is never held up by a long apply."""
        if worker_id not in self._workers:
            raise UnknownWorker(f"worker {worker_id!r} is not registered (left or evicted): register again")
        self._touch(worker_id)

    def leave(self, worker_id: str) -> None:
        with self._cond:
            if worker_id in self._workers:
                log.info("shard %d: worker %s left", self.cfg.shard_id, worker_id)
                self._remove(worker_id, left=True)

    def evict_expired(self) -> list[str]:
        """Evict workers silent for longer than the timeout; returns their ids. Also ends the wait
        for checkpointed workers that did not come back after a restore."""
        with self._cond:
            if self._awaiting and self._now() >= self._awaiting_deadline:
                log.warning("shard %d: workers %s did not come back after the restore; going on without them",
                            self.cfg.shard_id, sorted(self._awaiting))
                self._awaiting.clear()
                self._maybe_complete_step()
                self._cond.notify_all()
            deadline = self._now() - self.cfg.worker_timeout
            gone = [wid for wid in self._workers if self._seen.get(wid, 0.0) < deadline]
            for wid in gone:
                log.warning("shard %d: evicting worker %s (silent for over %.1fs)", self.cfg.shard_id, wid, self.cfg.worker_timeout)
                self.counters["evictions"] += 1
                self._remove(wid, left=False)
            return gone

    def count(self, counter: str, n: int = 1) -> None:
        with self._cond:
            self.counters[counter] += n

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def stats(self) -> dict:
        with self._cond:
            return {
                "shard_id": self.cfg.shard_id,
                "mode": self.policy.name,
                "version": self.version,
                "clocks": {wid: w.clock for wid, w in self._workers.items()},
                "staleness_histogram": dict(self.staleness_hist),
                "active_workers": len(self._workers),
                "initialized": self.store.initialized,
                "num_keys": len(self.store.params),
                "num_elements": self.store.num_elements(),
                "backup_workers": self.cfg.backup_workers,
                **{k: self.counters[k] for k in ("pushes", "pulls", "rejected", "evictions", "dropped", "duplicates",
                                                 "bytes_pushed", "bytes_pulled", "lost_updates", "checkpoints")},
            }

    def metrics(self) -> dict:
        """What the Prometheus endpoint exports (see ps.server.metrics)."""
        with self._cond:
            return {"shard_id": self.cfg.shard_id, "mode": self.policy.name, "version": self.version,
                    "active_workers": len(self._workers), "counters": dict(self.counters),
                    "staleness_histogram": dict(self.staleness_hist),
                    "apply_latency": (APPLY_BUCKETS, list(self._apply_counts), self._apply_seconds)}

    # -- checkpoints --------------------------------------------------------------------------
    def snapshot(self) -> Snapshot | None:
        """A consistent copy of everything needed to resume (None before init)."""
        with self._cond:
            if not self.store.initialized:
                return None
            assert self.plan is not None and self.optimizer_cfg is not None and self.store.optimizer is not None
            clocks = dict(self._departed)
            clocks.update({wid: w.clock for wid, w in self._workers.items()})
            acc, acc_counts = self.store.accumulated()
            return Snapshot(
                self.cfg.shard_id, self.cfg.num_shards, self.policy.name, self.plan, self.optimizer_cfg, self.version,
                clocks, dict(self.staleness_hist), dict(self.counters),
                {k: p.detach().clone() for k, p in self.store.params.items()}, self.store.optimizer.state(),
                sorted(self._workers), acc, acc_counts, self._step_pushes)

    def restore(self, snap: Snapshot) -> None:
        """Resume from `snap` (before serving). Its workers count as departed with their clocks:
        each registers again on its next call and is told its clock (and `_catch_up`). Until the
        ones active at the snapshot are back (or one lease timeout passed), steps and reads that
        wait for everyone go on waiting. A sync step's partial sum is restored with it."""
        with self._cond:
            self.store.init(snap.params, snap.optimizer)
            assert self.store.optimizer is not None
            self.store.optimizer.load_state(snap.optimizer_state)
            self.store.restore_accumulated(snap.accumulated, snap.accumulated_counts)
            self._step_pushes = snap.step_pushes
            self._restored_workers = frozenset(snap.clocks)
            self._awaiting = set(snap.active)
            self._awaiting_deadline = self._now() + self.cfg.worker_timeout
            self.plan, self.optimizer_cfg, self.version = snap.plan, snap.optimizer, snap.version
            self._workers.clear()
            self._departed = dict(snap.clocks)
            self._ever = set(snap.clocks)
            self.staleness_hist = Counter(snap.staleness_histogram)
            self.counters = Counter(snap.counters)
            log.info("shard %d: restored version %d (%d slices, %d workers' clocks)", self.cfg.shard_id,
                     self.version, len(snap.params), len(snap.clocks))


def _check_part(part: int, num_parts: int) -> None:
    if not 1 <= num_parts <= MAX_PARTS:
        raise InvalidArgument(f"num_parts ({num_parts}) must be in [1, {MAX_PARTS}]")
    if not 0 <= part < num_parts:
        raise InvalidArgument(f"part ({part}) must be in [0, num_parts={num_parts})")


def _validate_slices(tensors: Sequence[tuple[str, torch.Tensor]], expected: dict[str, int]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors:
        if key not in expected:
            raise InvalidArgument(f"init slice {key!r} is not assigned to this shard by the plan")
        if key in out:
            raise InvalidArgument(f"init slice {key!r} appears more than once")
        if tuple(t.shape) != (expected[key],):
            raise InvalidArgument(f"init slice {key!r}: shape {list(t.shape)} must be [{expected[key]}]")
        if not bool(torch.isfinite(t).all()):
            raise InvalidArgument(f"init slice {key!r} holds NaN or Inf values")
        out[key] = t
    return out
