"""One server shard's state machine: membership, clocks, pending pushes, versions, stats.

Free of gRPC and of any event loop: the servicer decodes a request, calls a method here, and
encodes the result. Every public method is thread-safe. Two kinds of lock:

* the state lock guards membership, clocks, versions and pending parts; it is held only for
  bookkeeping, never for tensor work;
* each slice's lock (in `ParamStore`) guards its values and optimizer state; validation needs
  none, updates take one slice at a time, so pushes of several workers apply concurrently.

A push is *reserved* under the state lock (duplicate and step checks, its clock marked busy),
applied outside it, and *committed* under it again (clock, version). A pull that must wait
(sync, ssp) does not block a thread: `ready_or_wait` registers a callback that runs when the
shard's state moves, and the caller checks again then.
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
from ps.errors import (InvalidArgument, NotInitialized, PlanMismatch, PSError, StepConflict, Unavailable,
                       UnknownWorker)
from ps.server.checkpoint import Snapshot
from ps.server.policy import View, Verdict, make_policy
from ps.server.store import ParamStore
from ps.server.table import TableSet
from ps.sharding import Plan

log = logging.getLogger("ps.server")

MAX_CLOCK = (1 << 62)  # clocks and versions stay far below int64's limit
MAX_DEPARTED = 1 << 16  # departed workers remembered (oldest forgotten first)
MAX_MEMBERS = 1 << 10  # processes that may push one push together (a tensor-parallel group's ranks)
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)  # seconds


@dataclass
class _Worker:
    clock: int                 # the next clock this shard takes from it
    taken: int                 # pushes below this clock were taken here (applied, accumulated or dropped)
    progress_at: float         # when its clock last moved (or it joined)
    ready_at: float = 0.0      # when a pull of its was last let through (it could compute from then)
    busy: set[int] = field(default_factory=set)  # clocks whose push is being applied now
    last: tuple[int, "PushResult"] | None = None  # the clock and outcome of its last push taken here


@dataclass
class _Departed:
    clock: int
    taken: int
    at: float


@dataclass
class _Pending:
    """Parts of one multi-request upload (a push or an init) not yet complete. A push's parts are
    keyed (member, part): the members of a group (a tensor-parallel group's ranks, pushing as one
    worker) each send parts of their own, and `counts` holds how many each member sends."""

    clock: int
    num_parts: int
    base_version: int = 0
    at: float = 0.0
    nbytes: int = 0
    parts: dict = field(default_factory=dict)
    members: int = 1
    counts: dict[int, int] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)  # the keys the held parts carry (pushes: each once)

    def member_done(self, member: int) -> bool:
        return sum(1 for m, _ in self.parts if m == member) == self.counts.get(member, -1)

    def complete(self) -> bool:
        return len(self.counts) == self.members and len(self.parts) == sum(self.counts.values())

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
    outcome: str  # BUFFERED | APPLIED | ACCUMULATED | DUPLICATE | DROPPED | EVICTED
    version: int
    staleness: int = 0
    wait: bool = False  # a group member sent all its parts: its outcome is the push's (`push_outcome_or_wait`)


def _nbytes(values: dict[str, torch.Tensor | None]) -> int:
    return sum(t.numel() * t.element_size() for t in values.values() if t is not None)


class Shard:
    def __init__(self, cfg: ServerConfig, now: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.policy = make_policy(cfg.mode, cfg.staleness, cfg.backup_workers)
        self._now = now
        self._lock = threading.Condition(threading.Lock())
        self._alloc = None  # where slices are allocated (`allocate_with`); None: private memory
        self.store = ParamStore()
        self.plan: Plan | None = None
        self.optimizer_cfg: OptimizerConfig | None = None
        self.version = 0
        self._workers: dict[str, _Worker] = {}
        # Lease renewals are written outside the state lock, so a worker is never evicted for
        # waiting on a lock (single dict writes are atomic under the GIL).
        self._seen: dict[str, float] = {}
        self._departed: dict[str, _Departed] = {}  # workers that left or were evicted
        self._joined: set[str] = set()  # ids seen until the quorum is reached, then dropped
        self._quorum = cfg.num_workers <= 0
        self._frozen = False  # a snapshot is copying the slices: no push may start meanwhile
        self._pending_push: dict[str, _Pending] = {}
        self._pending_init: dict[str, _Pending] = {}
        self.pending_bytes = 0  # held in half-assembled pushes (admission control counts them)
        self._step_pushes = 0  # pushes accumulated into the current sync step
        self._inflight = 0     # reserved pushes being applied or accumulated outside the lock
        self._applying = False  # a sync step's update is being applied outside the lock
        self._waiters: list[Callable[[], None]] = []  # pulls waiting for the shard's state to move
        self._push_waiters: list[Callable[[], None]] = []  # group members waiting for their push's outcome
        self._last_min_clock = 0
        self._initializing = False  # one worker's complete init is building the slices
        self.staleness_hist: Counter[int] = Counter()
        self.counters: Counter[str] = Counter()
        self._apply_counts = [0] * (len(APPLY_BUCKETS) + 1)  # the last one: above every bound
        self._apply_seconds = 0.0
        self._restored_workers: frozenset[str] = frozenset()  # ids in the checkpoint restored
        # A shard initialised again after an empty restart, or within a lease of a fresh init (a
        # restart that nobody told it of): registering workers catch it up (`_catch_up`).
        self._recovered = False
        self._fresh_until = 0.0
        self._awaiting: set[str] = set()  # of those, the ones active then and not registered again yet
        self._awaiting_deadline = 0.0
        self._stopped = False
        self._on_stop: list[Callable[[], None]] = []
        self._on_depart: list[Callable[[str], None]] = []
        self._max_seen = 0  # the highest version a registering worker had read, before init
        self._quorum_deadline = 0.0  # a shard initialised again after an empty restart: quorum by then
        # Server-held embedding tables (ps.server.table), in their own mode, with this membership.
        self.tables = TableSet(self, cfg.table_mode or cfg.mode,
                               cfg.staleness if cfg.table_staleness < 0 else cfg.table_staleness)

    # -- helpers (state lock held) ----------------------------------------------------------
    def _view(self) -> View:
        clocks = tuple(w.clock for w in self._workers.values())
        # After a restore, steps also wait for the workers the checkpoint had (until they are back,
        # or for one lease timeout): none may find a step done without its gradient.
        back = not self._awaiting or self._now() >= self._awaiting_deadline
        return View(self.version, clocks, self._quorum and back)

    def _wake(self) -> None:
        """Run (and forget) every waiting pull's callback: the state they wait on may have moved."""
        waiters, self._waiters = self._waiters + self._push_waiters, []
        self._push_waiters = []
        for wake in waiters:
            wake()
        self._lock.notify_all()

    def _wake_if_floor_moved(self) -> None:
        """ssp pulls wait on the slowest clock: wake them only when it moved."""
        if self._waiters and self.policy.name == "ssp":
            floor = self._view().min_clock
            if floor != self._last_min_clock:
                self._last_min_clock = floor
                self._wake()

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
        _check_clock("clock", clock)

    def _touch(self, worker_id: str) -> None:
        if worker_id:
            self._seen[worker_id] = self._now()

    def _worker(self, worker_id: str) -> _Worker:
        self.check_registered(worker_id)
        self._touch(worker_id)
        return self._workers[worker_id]

    def _maybe_complete_step(self) -> None:
        """Complete the sync step if the policy says so. The update is applied outside the state
        lock (released and taken again here): callers must not rely on state read before."""
        while not self._applying and not self._frozen:
            view = self._view()
            if self._inflight == 0 and self.policy.step_ready(view, self._step_pushes):
                self._applying = True
                self._lock.release()
                try:
                    with self._timed_apply():
                        self.store.apply_accumulated()
                finally:
                    self._lock.acquire()
                    self._applying = False
                self._step_pushes = 0
                self.version += 1
                self.staleness_hist[0] += 1
                self._wake()
                continue
            if (self.policy.name == "sync" and self._step_pushes == 0 and self._inflight == 0 and view.quorum
                    and self.store.initialized
                    and view.clocks and all(c > view.version for c in view.clocks)):
                # Every active worker is past this step, yet none of its gradients is here: they were
                # lost with a server restart. Waiting would wait forever; the step is skipped instead.
                log.warning("shard %d: step %d has no gradient left (lost in a restart); skipping it",
                            self.cfg.shard_id, self.version)
                self.counters["lost_updates"] += 1
                self.store.clear_accumulated()
                self.version += 1
                self._wake()
                continue
            return

    def _remove(self, worker_id: str, left: bool) -> None:
        w = self._workers.pop(worker_id, None)
        self._seen.pop(worker_id, None)
        if w is not None:
            self._departed[worker_id] = _Departed(w.clock, w.taken, self._now())
            if len(self._departed) > MAX_DEPARTED:  # dicts keep insertion order: the oldest first
                del self._departed[next(iter(self._departed))]
        if left:  # an evicted worker may come back and finish a push it had begun
            self._drop_pending(self._pending_push, worker_id)
        self._drop_pending(self._pending_init, worker_id)
        self._maybe_complete_step()
        self._wake()
        if w is not None:
            for callback in self._on_depart:
                callback(worker_id)

    def _drop_pending(self, table: dict[str, _Pending], worker_id: str) -> None:
        pending = table.pop(worker_id, None)
        if pending is not None:
            self.pending_bytes -= pending.nbytes

    def _catch_up(self, seen_version: int) -> None:
        """A worker has read version `seen_version` of this shard, which restarted (from a checkpoint
        that knew the worker, or empty): above the shard's version, it is how the shard learns how
        many updates it lost. It takes that version (sync: skips those steps) and counts them."""
        if (seen_version > self.version and self.store.initialized and not self._applying and not self._inflight
                and not self._frozen):
            lost = seen_version - self.version
            log.warning("shard %d: a worker has seen version %d but the shard restored version %d: %d updates lost",
                        self.cfg.shard_id, seen_version, self.version, lost)
            self.counters["lost_updates"] += lost
            self.version = seen_version
            self.store.clear_accumulated()
            self._step_pushes = 0

    def _mark_taken(self, worker_id: str, w: _Worker, clock: int) -> None:
        """A push at `clock` was applied, accumulated or dropped: record it on the worker, or on
        its departed record if it was evicted meanwhile (a retry must then be a duplicate)."""
        for rec in (w, self._workers.get(worker_id), self._departed.get(worker_id)):
            if rec is not None:
                rec.taken = max(rec.taken, clock + 1)
                rec.clock = max(rec.clock, clock + 1)
        w.progress_at = self._now()

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
        with self._lock:
            self._reject(exc)

    @contextlib.contextmanager
    def _refusing(self):
        """Count any PSError raised inside as a rejected request (validation outside the lock)."""
        try:
            yield
        except PSError as e:
            self.reject(e)

    # -- RPCs ---------------------------------------------------------------------------------
    def register(self, worker_id: str, fingerprint: str, clock: int = 0, seen_version: int = 0) -> dict:
        """Join (or rejoin, or renew); a `clock` above this worker's moves it up (a worker aligning
        itself across shards). A worker that comes back never gets a clock below the one it had,
        so its retried pushes stay duplicates. `seen_version`: see `_catch_up`."""
        with self._refusing():
            if not worker_id:
                raise InvalidArgument("worker_id must be a non-empty string")
            _check_clock("clock", clock)
            _check_clock("seen_version", seen_version)
        with self._lock:
            while self._frozen:  # a catch-up must not be skipped (nor change state a snapshot copies)
                self._lock.wait(0.05)
            self._check_plan(fingerprint)
            # A worker never reads a version above a shard's own unless the shard restarted (from a
            # checkpoint, or empty) and lost updates. Only a shard that restarted listens: a stray
            # client must not move a healthy shard.
            if worker_id in self._restored_workers or self._recovered or self._now() < self._fresh_until:
                self._catch_up(seen_version)
            if not self.store.initialized:
                self._max_seen = max(self._max_seen, seen_version)
            self._awaiting.discard(worker_id)
            w = self._workers.get(worker_id)
            if w is None:
                gone = self._departed.pop(worker_id, None)
                join = self.policy.join_clock(self._view())
                w = self._workers[worker_id] = (
                    _Worker(max(join, gone.clock), gone.taken, self._now()) if gone else _Worker(join, join, self._now()))
                if not self._quorum:
                    self._joined.add(worker_id)
                    if len(self._joined) >= self.cfg.num_workers:
                        self._quorum, self._joined = True, set()
                log.info("shard %d: worker %s joined at clock %d", self.cfg.shard_id, worker_id, w.clock)
            if clock > w.clock:
                w.clock = clock
                w.progress_at = self._now()
                self._maybe_complete_step()
            self._touch(worker_id)
            self._wake()
            return {"initialized": self.store.initialized, "clock": w.clock, "version": self.version}

    def init(self, worker_id: str, plan: Plan, fingerprint: str, optimizer: OptimizerConfig,
             tensors: Sequence[tuple[str, torch.Tensor]], part: int, num_parts: int, version: int = 0) -> bool:
        """One part of the initial values. Validated outside the state lock (on an initialised
        shard too: bad input is refused, not ignored); the slices are built outside it too, and
        the first complete init wins. `version` > 0: a worker re-initialises a shard that
        restarted empty from weights it holds at that version (see `_build`)."""
        self._touch(worker_id if worker_id in self._workers else "")
        with self._refusing():
            if plan.fingerprint != fingerprint:
                raise PlanMismatch(f"plan fingerprint {fingerprint!r} does not match the plan sent ({plan.fingerprint!r})")
            if plan.num_shards != self.cfg.num_shards:
                raise PlanMismatch(f"plan has {plan.num_shards} shards but this cluster has {self.cfg.num_shards}")
            self._check_plan(fingerprint)
            expected = {s.key: s.length for s in plan.slices_for(self.cfg.shard_id)}
            _check_part(part, num_parts, len(expected))
            _check_clock("version", version)
            values = _validate_slices(tensors, expected)
        with self._lock:
            self._worker(worker_id)
            if self._settled_init(fingerprint, optimizer):
                return False
            pending = self._pending_init.get(worker_id)
            if pending is None or pending.num_parts != num_parts:
                self._drop_pending(self._pending_init, worker_id)
                pending = self._pending_init[worker_id] = _Pending(0, num_parts)
            self._hold(pending, part, values)
            pending.base_version = max(pending.base_version, version)
            if len(pending.parts) < num_parts:
                return False
            self._drop_pending(self._pending_init, worker_id)
            while self._initializing:  # another complete init is building: it wins if it succeeds
                self._lock.wait(0.05)
            if self._settled_init(fingerprint, optimizer):
                return False
            self._initializing = True
        try:
            return self._build(worker_id, plan, fingerprint, optimizer, pending, expected)
        finally:
            with self._lock:
                self._initializing = False
                self._lock.notify_all()

    def _settled_init(self, fingerprint: str, optimizer: OptimizerConfig) -> bool:
        """(state lock held) True if the shard is initialised and this init agrees with it."""
        if not self.store.initialized:
            return False
        if fingerprint != self.plan.fingerprint:
            self._reject(PlanMismatch(f"plan fingerprint {fingerprint!r} differs from this shard's "
                                      f"{self.plan.fingerprint!r}"))
        if optimizer != self.optimizer_cfg:
            self._reject(PlanMismatch(f"optimizer {optimizer} differs from the servers' {self.optimizer_cfg}"))
        return True

    def _build(self, worker_id: str, plan: Plan, fingerprint: str, optimizer: OptimizerConfig, pending: _Pending,
               expected: dict[str, int]) -> bool:
        merged = pending.merged("init")
        if set(merged) != set(expected):
            missing = sorted(set(expected) - set(merged))[:5]
            self.reject(InvalidArgument(f"init is missing slices of this shard, e.g. {missing}"))
        store = ParamStore(self._alloc)
        store.init(merged, optimizer)  # the copies and optimizers, built with no lock held
        with self._lock:
            if self._alloc is not None and store.allocator is not self._alloc:  # set while this was built
                store.allocate_with(self._alloc)
                for key in list(store.params):
                    store.move(key)
            self.store = store
            for other in list(self._pending_init):
                self._drop_pending(self._pending_init, other)
            self.plan, self.optimizer_cfg = plan, optimizer
            log.info("shard %d: initialised %d slices (plan %s)", self.cfg.shard_id, len(merged), fingerprint)
            if pending.base_version > 0 or self._max_seen > 0:
                self._reinitialized(worker_id, pending.base_version)
                self._maybe_complete_step()  # sync: every worker may be past the step it took
            else:  # a fresh start, or an empty restart whose workers have not registered yet
                self._fresh_until = self._now() + self.cfg.worker_timeout
            self._wake()
            return True

    def _reinitialized(self, worker_id: str, version: int) -> None:
        """(state lock held) This shard restarted empty and a worker sent the weights it holds, at
        `version`: the shard takes the highest version any worker has read (sync: the step the
        workers are at), counts the updates past the sender's as lost (they and the optimizer's
        state died with the shard), and catches up the workers that register later."""
        self.version = max(version, self._max_seen)
        lost = self._max_seen - version if self._max_seen > version else 0
        log.warning("shard %d: restarted empty; worker %s initialised it again from its weights at version %d "
                    "(taking version %d; %d updates and the optimizer's state lost)", self.cfg.shard_id, worker_id,
                    version, self.version, lost)
        self.counters["reinitialized"] += 1
        self.counters["lost_updates"] += lost
        self._recovered = True
        self.tables.restarted()
        if not self._quorum:  # the shard had had its quorum: wait one lease for the workers to come back
            self._quorum_deadline = self._now() + self.cfg.worker_timeout

    def _hold(self, pending: _Pending, part: int, values: dict[str, torch.Tensor]) -> None:
        old = pending.parts.get(part)
        if old is not None:
            pending.nbytes -= _nbytes(old)
            self.pending_bytes -= _nbytes(old)
        pending.parts[part] = values
        pending.keys.update(values)
        n = _nbytes(values)
        pending.nbytes += n
        self.pending_bytes += n
        pending.at = self._now()

    def check_pull(self, worker_id: str, fingerprint: str, clock: int, keys: Sequence[str]) -> None:
        """Validate a pull (nothing waits or changes); renews the worker's lease."""
        self._touch(worker_id if worker_id in self._workers else "")
        with self._refusing():
            self._check_request(fingerprint, clock)
            if len(set(keys)) != len(keys):
                raise InvalidArgument("a pull names the same key more than once")
            self.store.check_keys(keys)

    def ready_or_wait(self, worker_id: str, clock: int, wake: Callable[[], None]) -> bool:
        """True if a worker at `clock` may read now (an empty worker_id always may). Otherwise
        `wake` is registered, to be called (once, from any thread, with the state lock held:
        it must only schedule) when the shard's state moves; then ask again. Raises
        UnknownWorker once the worker is evicted, Unavailable once the shard is stopping."""
        if not worker_id:
            return True
        with self._lock:
            if self._stopped:  # the client retries elsewhere or after the restart
                raise Unavailable(f"shard {self.cfg.shard_id} is stopping")
            w = self._worker(worker_id)
            if self.policy.pull_ready(clock, self._view()):
                w.ready_at = self._now()
                return True
            self._waiters.append(wake)
            return False

    def forget(self, wake: Callable[[], None]) -> None:
        """Withdraw a callback `ready_or_wait` registered (its pull was abandoned)."""
        with self._lock:
            for waiting in (self._waiters, self._push_waiters):
                with contextlib.suppress(ValueError):
                    waiting.remove(wake)

    def read(self, keys: Sequence[str], encode: Callable | None = None, keep: bool = False):
        """The slices for `keys`: (slices, version, min_clock) with copies of their bytes, or
        encode(views, version, min_clock, kept) called with read-only views of the live slices
        while their locks are held: it must copy what it keeps unless `kept` (asked for with
        `keep`, and the store's slices copy on write: see ParamStore.reading). The slices hold
        at least the `version` updates (async: maybe more, applied meanwhile)."""
        with self._lock:
            self.counters["pulls"] += 1
            version, min_clock = self.version, self._view().min_clock
        with self.store.reading(keys, keep) as views:
            nbytes = sum(v.nbytes for _, v in views)
            out = (encode(views, version, min_clock, keep and self.store.immutable) if encode is not None
                   else ([(k, v.tobytes()) for k, v in views], version, min_clock))
        with self._lock:
            self.counters["bytes_pulled"] += nbytes
        return out

    def pull(self, worker_id: str, fingerprint: str, clock: int, keys: Sequence[str], encode: Callable | None = None):
        """check_pull, wait (blocking this thread) until ready, read: for callers without an event loop."""
        self.check_pull(worker_id, fingerprint, clock, keys)
        while True:
            ready = threading.Event()
            if self.ready_or_wait(worker_id, clock, ready.set):
                return self.read(keys, encode)
            ready.wait()

    def push(self, worker_id: str, fingerprint: str, clock: int, base_version: int,
             grads: Sequence[tuple[str, torch.Tensor]], part: int, num_parts: int,
             wire_bytes: int | None = None, no_grad: Sequence[str] = (), member: int = 0,
             members: int = 0) -> PushResult:
        """Validate (no lock), reserve, apply or accumulate (slice locks), commit.
        wire_bytes: what the gradients took on the wire (sparse ones less than dense), for stats.
        no_grad: keys this push covers without a gradient (never stepped by it; in sync mode
        they count as this worker's zero in the step's average).
        member, members: this part comes from member `member` of `members` processes that push
        as one worker (a tensor-parallel group; 0 or 1: a worker alone), each with `num_parts`
        parts of its own; the push is complete when every member's parts are in. A member's
        last part answers `wait`: its outcome is the push's (`push_outcome_or_wait`)."""
        self._touch(worker_id if worker_id in self._workers else "")
        members = max(members, 1)
        with self._refusing():
            self._check_request(fingerprint, clock)
            _check_clock("base_version", base_version)
            _check_part(part, num_parts, len(self.store.params))
            if not 1 <= members <= MAX_MEMBERS or not 0 <= member < members:
                raise InvalidArgument(f"member ({member}) of members ({members}) must satisfy "
                                      f"0 <= member < members <= {MAX_MEMBERS}")
            values = self.store.validate(grads, no_grad=no_grad)
        with self._lock:
            while self._frozen:  # a snapshot is copying the slices (large shards: on a pool thread)
                self._lock.wait(0.05)
            w = self._worker(worker_id)  # an unknown worker registers first (and may catch the shard up)
            # A base ahead of the shard comes from updates a restored shard forgot: staleness 0.
            base_version = min(base_version, self.version)
            if self.policy.on_push(clock, self._view()) is Verdict.AHEAD:
                self._reject(StepConflict(f"push for sync step {clock} but the shard is at step {self.version}"))
            if clock < w.taken or clock in w.busy:  # a retry; a group's other members may wait for the outcome
                self.counters["duplicates"] += 1
                if members > 1 and w.last is not None and w.last[0] == clock:
                    return w.last[1]  # a member re-sending after a rejoin hears what the others heard
                return PushResult("DUPLICATE", self.version, wait=members > 1 and clock in w.busy)
            if clock < w.clock:  # never taken: the worker was placed past it when it came back
                self.counters["refused_evicted"] += 1
                return PushResult("EVICTED", self.version)
            pending = self._pending_push.get(worker_id)
            if pending is not None and pending.clock == clock:
                if pending.members != members:
                    self._reject(InvalidArgument(f"members ({members}) differs from earlier parts' ({pending.members})"))
                if pending.counts.get(member, num_parts) != num_parts:
                    self._reject(InvalidArgument(f"num_parts ({num_parts}) differs from earlier parts "
                                                 f"({pending.counts[member]})"))
                if (member, part) in pending.parts:
                    self.counters["duplicates"] += 1
                    return PushResult("DUPLICATE", self.version, wait=members > 1 and pending.member_done(member))
            elif pending is not None and pending.clock > clock:
                self.counters["dropped"] += 1
                return PushResult("DROPPED", self.version)
            else:
                self._drop_pending(self._pending_push, worker_id)
                pending = self._pending_push[worker_id] = _Pending(clock, num_parts, base_version, members=members)
            # The same key in two parts (of one worker, or of two members): refused before it is held.
            twice = next((k for k in values if k in pending.keys), None)
            if twice is not None:
                self._reject(InvalidArgument(f"gradient key {twice!r} was already sent by another part of "
                                             "this push (each key once per push)"))
            pending.counts[member] = num_parts
            self._hold(pending, (member, part), values)
            pending.base_version = min(pending.base_version, base_version)
            self.counters["bytes_pushed"] += _nbytes(dict(grads)) if wire_bytes is None else wire_bytes
            if not pending.complete():
                return PushResult("BUFFERED", self.version, wait=members > 1 and pending.member_done(member))
            self._drop_pending(self._pending_push, worker_id)
            try:
                merged = pending.merged("gradient")
            except InvalidArgument as e:
                self._wake()  # a group's other members waiting for this push hear it is gone
                self._reject(e)
            verdict = self.policy.on_push(clock, self._view())
            if verdict is Verdict.LATE or (verdict is Verdict.ACCUMULATE and self._applying):
                self._mark_taken(worker_id, w, clock)
                self.counters["dropped"] += 1
                self._maybe_complete_step()
                return self._decided(w, clock, PushResult("DROPPED", self.version), members > 1)
            staleness = self.version - pending.base_version
            w.busy.add(clock)
            self._inflight += 1
        return self._apply(worker_id, w, clock, verdict, staleness, merged, members > 1)

    def _decided(self, w: _Worker, clock: int, result: PushResult, group: bool) -> PushResult:
        """(state lock held) A push was taken: remember its outcome; a group's other members
        waiting for it (`push_outcome_or_wait`) are woken."""
        w.last = (clock, result)
        if group:  # only the members waiting for it: pulls wait on other state
            waiters, self._push_waiters = self._push_waiters, []
            for wake in waiters:
                wake()
        return result

    def push_outcome_or_wait(self, worker_id: str, clock: int, wake: Callable[[], None]) -> PushResult | None:
        """For a group member that sent all its parts of the push for `clock`: the push's outcome
        once every member's parts are in and it was taken (or why it never will be). Until
        then None, with `wake` registered as in `ready_or_wait`."""
        with self._lock:
            if self._stopped:
                raise Unavailable(f"shard {self.cfg.shard_id} is stopping")
            if worker_id not in self._workers:
                pending = self._pending_push.get(worker_id)
                if pending is not None and pending.clock == clock:
                    # Evicted meanwhile, its half-built push kept a lease: the member registers again,
                    # sends its parts again, then hears the outcome.
                    self._worker(worker_id)
                gone = self._departed.get(worker_id)  # it left (or the push is gone): do not revive it
                return PushResult("DUPLICATE" if gone is not None and clock < gone.taken else "EVICTED", self.version)
            w = self._worker(worker_id)
            if clock < w.taken:
                return w.last[1] if w.last is not None and w.last[0] == clock else PushResult("DUPLICATE", self.version)
            pending = self._pending_push.get(worker_id)
            if clock not in w.busy:
                if pending is not None and pending.clock == clock and clock < w.clock:
                    # The worker was placed past it (it registered at a later clock): never to be taken.
                    self._drop_pending(self._pending_push, worker_id)
                    pending = None
                if pending is None or pending.clock != clock:  # dropped, refused, or a later push replaced it
                    return PushResult("EVICTED" if clock < w.clock else "DROPPED", self.version)
            self._push_waiters.append(wake)
            return None

    def _apply(self, worker_id: str, w: _Worker, clock: int, verdict: Verdict, staleness: int,
               grads: dict[str, torch.Tensor | None], group: bool = False) -> PushResult:
        """The reserved push's tensor work, outside the state lock, then its commit. A push with
        no gradient at all here (a TP rank's, or keys without gradients) only moves the clock."""
        stepped = any(g is not None for g in grads.values())
        try:
            if verdict is Verdict.ACCUMULATE:
                self.store.accumulate(grads)
            elif stepped:
                with self._timed_apply():
                    self.store.apply(grads, 1.0 / (1 + staleness) if self.cfg.staleness_lr else 1.0)
        except BaseException:
            with self._lock:
                self._inflight -= 1
                w.busy.discard(clock)
                self._maybe_complete_step()  # it may have been the one push a ready step waited for
                self._lock.notify_all()
                if group:
                    self._wake()
            raise
        with self._lock:  # the clock is marked taken before it stops being busy: no retry slips in
            self._inflight -= 1
            w.busy.discard(clock)
            self._mark_taken(worker_id, w, clock)
            self.counters["pushes"] += 1
            if verdict is Verdict.ACCUMULATE:
                self._step_pushes += 1
                before = self.version
                self._maybe_complete_step()
                return self._decided(w, clock, PushResult("APPLIED" if self.version > before else "ACCUMULATED",
                                                          self.version), group)
            if stepped:
                self.version += 1
                self.staleness_hist[staleness] += 1
            self._wake_if_floor_moved()
            self._lock.notify_all()
            return self._decided(w, clock, PushResult("APPLIED", self.version, staleness if stepped else 0), group)

    def check_registered(self, worker_id: str) -> None:
        """UnknownWorker unless `worker_id` is registered (nothing changes: no lease is renewed)."""
        if worker_id not in self._workers:
            raise UnknownWorker(f"worker {worker_id!r} is not registered (left or evicted): register again")

    def heartbeat(self, worker_id: str) -> None:
        """Renew the lease; needs no lock, so it is never held up."""
        self.check_registered(worker_id)
        self._touch(worker_id)

    def leave(self, worker_id: str) -> None:
        with self._lock:
            if worker_id in self._workers:
                log.info("shard %d: worker %s left", self.cfg.shard_id, worker_id)
                self._remove(worker_id, left=True)

    def evict_expired(self) -> list[str]:
        """Evict workers silent for longer than the lease, and (sync, ssp) workers a waiting step
        is blocked on whose clock has not moved for `progress_timeout`; returns their ids. Also
        ends the wait for checkpointed workers that did not come back after a restore, and
        forgets half-assembled pushes of workers that are gone and departed workers long gone."""
        now = self._now()
        with self._lock:
            if not self._quorum and self._quorum_deadline and now >= self._quorum_deadline:
                log.warning("shard %d: %d of %d workers came back after the restart; going on with them",
                            self.cfg.shard_id, len(self._workers), self.cfg.num_workers)
                self._quorum, self._joined = True, set()
                self._maybe_complete_step()
                self._wake()
            if self._awaiting and now >= self._awaiting_deadline:
                log.warning("shard %d: workers %s did not come back after the restore; going on without them",
                            self.cfg.shard_id, sorted(self._awaiting))
                self._awaiting.clear()
                self._maybe_complete_step()
                self._wake()
            silent = now - self.cfg.worker_timeout
            gone = [wid for wid in self._workers if self._seen.get(wid, 0.0) < silent]
            for wid in list(gone):
                if wid not in self._workers or self._seen.get(wid, 0.0) >= silent:  # changed meanwhile
                    gone.remove(wid)
                    continue
                log.warning("shard %d: evicting worker %s (silent for over %.1fs)", self.cfg.shard_id, wid,
                            self.cfg.worker_timeout)
                self.counters["evictions"] += 1
                self._remove(wid, left=False)
            stalled, version = [], self.version
            for wid in self._stalled(now):
                # Evicting one may complete the step: the others then wait for their next pull.
                if self.version != version or wid not in self._stalled(now, waited=False):
                    break
                stalled.append(wid)
                log.warning("shard %d: evicting worker %s (clock %d has not moved for %.1fs while others wait)",
                            self.cfg.shard_id, wid, self._workers[wid].clock, self.cfg.progress_timeout)
                self.counters["evictions"] += 1
                self.counters["stalled_evictions"] += 1
                self._remove(wid, left=False)
            for table in (self._pending_push, self._pending_init):  # a lease's time after the worker went
                for wid in [w for w in table if w not in self._workers
                            and (w not in self._departed or self._departed[w].at < silent)]:
                    self._drop_pending(table, wid)
            forget = now - max(600.0, 20 * self.cfg.worker_timeout)
            for wid in [w for w, d in self._departed.items() if d.at < forget]:
                del self._departed[wid]
            return gone + stalled

    def _stalled(self, now: float, waited: bool = True) -> list[str]:
        """Workers a waiting pull is blocked on whose clock has not moved for progress_timeout
        since they could last compute (their pull was let through, or they pushed). `waited`:
        only while some pull waits."""
        if (not self.cfg.progress_timeout or (waited and not self._waiters) or self.policy.name == "async"
                or self._applying or self._frozen):
            return []
        view = self._view()
        if not view.quorum or not view.clocks:
            return []
        floor = view.version if self.policy.name == "sync" else view.min_clock
        before = now - self.cfg.progress_timeout
        return [wid for wid, w in list(self._workers.items())
                if w.clock <= floor and not w.busy and max(w.progress_at, w.ready_at) < before]

    def count(self, counter: str, n: int = 1) -> None:
        with self._lock:
            self.counters[counter] += n

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def quorum(self) -> bool:
        """Whether the workers a step waits for have joined (see `_view`); read without the lock."""
        back = not self._awaiting or self._now() >= self._awaiting_deadline
        return self._quorum and back

    def active_clocks(self) -> dict[str, int]:
        """Active workers and their clocks, read without the state lock (a copy made under the
        GIL: the tables, which must not take this lock, read membership so)."""
        return {wid: w.clock for wid, w in list(self._workers.items())}

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from the stopping thread) when the shard stops."""
        self._on_stop.append(callback)

    def on_depart(self, callback: Callable[[str], None]) -> None:
        """Call `callback(worker_id)` when a worker leaves or is evicted (state lock held: it must
        only hand the news on)."""
        self._on_depart.append(callback)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._wake()
        self.tables.stop()
        for callback in self._on_stop:
            callback()

    def stats(self) -> dict:
        with self._lock:
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
                **{k: self.counters[k] for k in STAT_COUNTERS},
            }

    def metrics(self) -> dict:
        """What the Prometheus endpoint exports (see ps.server.metrics)."""
        tables = self.tables.stats()
        with self._lock:
            return {"shard_id": self.cfg.shard_id, "mode": self.policy.name, "version": self.version,
                    "active_workers": len(self._workers), "counters": dict(self.counters),
                    "waiting_pulls": len(self._waiters), "pending_bytes": self.pending_bytes,
                    "staleness_histogram": dict(self.staleness_hist),
                    "apply_latency": (APPLY_BUCKETS, list(self._apply_counts), self._apply_seconds),
                    "tables": tables}

    # -- checkpoints --------------------------------------------------------------------------
    def snapshot(self) -> Snapshot | None:
        """A consistent copy of everything needed to resume (None before init). The bookkeeping
        is read under the state lock once no push is being applied; the slices are then copied
        outside it while no push may start (the event loop keeps serving pulls and health)."""
        with self._lock:
            while self._frozen:
                self._lock.wait(0.1)
            if not self.store.initialized:
                return None
            self._frozen = True  # no new push starts; the ones applying now finish
            while self._inflight or self._applying:
                self._lock.wait(0.05)
            assert self.plan is not None and self.optimizer_cfg is not None and self.store.optimizer is not None
            clocks = {wid: d.taken for wid, d in self._departed.items()}
            clocks.update({wid: w.clock for wid, w in self._workers.items()})
            head = (self.cfg.shard_id, self.cfg.num_shards, self.policy.name, self.plan, self.optimizer_cfg,
                    self.version, clocks, dict(self.staleness_hist), dict(self.counters))
            active, step_pushes = sorted(self._workers), self._step_pushes
        try:
            acc, acc_counts = self.store.accumulated()
            # Frozen and drained: nothing writes a slice now, so the copy takes no slice lock and
            # pulls read beside it.
            params = {k: p.detach().clone() for k, p in self.store.params.items()}
            optimizer_state = self.store.optimizer.state()
        finally:
            with self._lock:
                self._frozen = False
                self._lock.notify_all()
                self._maybe_complete_step()
        return Snapshot(*head, params, optimizer_state, active, acc, acc_counts, step_pushes)

    def allocate_with(self, alloc) -> None:
        """Slices live from now on in the float32 buffers `alloc(n)` gives (ps.shm.Arena.empty),
        the current ones moved there one at a time (each under its own lock only: pushes, pulls
        and every other call go on meanwhile)."""
        with self._lock:
            self._alloc = alloc
            store = self.store
        store.allocate_with(alloc)
        for key in list(store.params):
            with self._lock:
                while self._frozen:  # a snapshot is copying the slices: they stay where they are meanwhile
                    self._lock.wait(0.05)
                store.move(key)

    def restore(self, snap: Snapshot) -> None:
        """Resume from `snap` (before serving). Its workers count as departed with their clocks:
        each registers again on its next call and is told its clock (and `_catch_up`). Until the
        ones active at the snapshot are back (or one lease timeout passed), steps and reads that
        wait for everyone go on waiting. A sync step's partial sum is restored with it."""
        with self._lock:
            self.store.init(snap.params, snap.optimizer)
            assert self.store.optimizer is not None
            self.store.optimizer.load_state(snap.optimizer_state)
            self.store.restore_accumulated(snap.accumulated, snap.accumulated_counts)
            self._step_pushes = snap.step_pushes
            self._awaiting = set(snap.active)
            self._awaiting_deadline = self._now() + self.cfg.worker_timeout
            self._restored_workers = frozenset(snap.clocks)
            self.plan, self.optimizer_cfg, self.version = snap.plan, snap.optimizer, snap.version
            self._workers.clear()
            self._departed = {wid: _Departed(c, c, self._now()) for wid, c in snap.clocks.items()}
            # A shard that had applied updates had had its quorum (the ids of the workers that made
            # it may have been forgotten since).
            self._quorum = snap.version > 0 or len(snap.clocks) >= self.cfg.num_workers
            self._joined = set() if self._quorum else set(snap.clocks)
            self.staleness_hist = Counter(snap.staleness_histogram)
            self.counters = Counter(snap.counters)
            if snap.tables is not None:
                self.tables.restore(snap.tables)
            self.tables.restarted()
            log.info("shard %d: restored version %d (%d slices, %d workers' clocks)", self.cfg.shard_id,
                     self.version, len(snap.params), len(snap.clocks))


STAT_COUNTERS = ("pushes", "pulls", "rejected", "evictions", "stalled_evictions", "dropped", "duplicates",
                 "refused_evicted", "overloaded", "bytes_pushed", "bytes_pulled", "lost_updates", "checkpoints",
                 "reinitialized")


def _check_clock(name: str, value: int) -> None:
    if not 0 <= value < MAX_CLOCK:
        raise InvalidArgument(f"{name} ({value}) must be in [0, 2^62)")


def _check_part(part: int, num_parts: int, slices: int) -> None:
    """A push or init has at most one part per slice (one part if the shard holds none)."""
    most = max(1, slices)
    if not 1 <= num_parts <= most:
        raise InvalidArgument(f"num_parts ({num_parts}) must be in [1, {most}] (one part per slice at most)")
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
