"""Server-held embedding tables: compact row storage, sparse optimizers, admission, eviction,
and the consistency modes applied to table pushes and pulls.

Storage of one table on one shard (`Table`): a growable float32 pool of rows ([capacity, dim]),
the optimizer's state in pools of the same rows, and an id -> row index (`IdIndex`: open
addressing over numpy arrays, looked up a batch at a time). Rows freed by eviction are reused.

Every worker sends each shard one table push per step (`TableSet.push`, all tables' rows in it,
possibly none), so the table clocks follow the dense ones: sync aggregates a step's pushes and
applies them once every active worker has pushed (the average, as for dense parameters); async
applies each on arrival; ssp applies on arrival and holds pulls to the bound. The table mode may
differ from the dense one (`--table-mode`: dense sync with async tables is PERSIA's hybrid).
Membership (leases, evictions) is the dense shard's: a worker that leaves or is evicted no longer
holds up a table step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ps.errors import InvalidArgument, PlanMismatch, StepConflict, Unavailable, UnknownTable
from ps.server.policy import View, Verdict, make_policy
from ps.tables import TableSpec, coalesce, init_rows, mix64

log = logging.getLogger("ps.server")

EMPTY, GONE = -1, -2  # IdIndex slots: never used; freed (a tombstone: probing goes on past it)
_INDEX_SALT = np.uint64(0x7AB1_E5EE_D1DE_A5E5)
MIN_CAPACITY = 1024
PENDING_CAP = 1 << 22  # ids one table's shard keeps admission counts for; beyond, the least recently seen go
MERGE_PARTS = 8  # sync: a step's pushes to one table are summed once this many are held
MAX_AHEAD = 1 << 20  # sync: a push may name a step this far past the tables' current one
TABLE_COUNTERS = ("created", "evicted_idle", "evicted_lru", "admission_dropped", "rows_pulled", "rows_pushed",
                  "pending_forgotten")


class IdIndex:
    """int64 id -> int64 value (>= 0), linear probing over two numpy arrays, a batch at a time."""

    def __init__(self, capacity: int = MIN_CAPACITY):
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.keys = np.zeros(capacity, np.int64)
        self.vals = np.full(capacity, EMPTY, np.int64)
        self.mask = capacity - 1
        self.live = 0
        self.gone = 0

    def __len__(self) -> int:
        return self.live

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return (mix64(ids.view(np.uint64) ^ _INDEX_SALT) & np.uint64(self.mask)).astype(np.int64)

    def find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, slots): -1 for ids not held."""
        n = len(ids)
        out, slots = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        todo, pos, want = np.arange(n), self._home(ids), ids
        while len(todo):
            v, k = self.vals[pos], self.keys[pos]
            hit = (v >= 0) & (k == want)
            out[todo[hit]], slots[todo[hit]] = v[hit], pos[hit]
            go = ~hit & (v != EMPTY)
            todo, pos, want = todo[go], (pos[go] + 1) & self.mask, want[go]
        return out, slots

    def insert(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Add ids (distinct, none held yet) with their values."""
        if (self.live + self.gone + len(ids)) * 2 > len(self.keys):
            self._rebuild(max(MIN_CAPACITY, 1 << int(2 * (self.live + len(ids))).bit_length()))
        todo, pos = np.arange(len(ids)), self._home(ids)
        while len(todo):
            v = self.vals[pos]
            free = v < 0
            claim, at = todo[free], pos[free]
            at_unique, first = np.unique(at, return_index=True)  # one id per free slot
            won = claim[first]
            self.gone -= int((self.vals[at_unique] == GONE).sum())
            self.keys[at_unique], self.vals[at_unique] = ids[won], values[won]
            placed = np.zeros(len(ids), bool)
            placed[won] = True
            left = ~placed[todo]
            todo, pos = todo[left], pos[left]
            pos = np.where(self.vals[pos] >= 0, (pos + 1) & self.mask, pos)
        self.live += len(ids)

    def remove_slots(self, slots: np.ndarray) -> None:
        self.vals[slots] = GONE
        self.live -= len(slots)
        self.gone += len(slots)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        used = self.vals >= 0
        return self.keys[used], self.vals[used]

    def _rebuild(self, capacity: int) -> None:
        keys, vals = self.items()
        self._alloc(capacity)
        if len(keys):
            self.insert(keys, vals)


class Recency:
    """Keys (ints) by the version they were last updated at, oldest first: the order in which
    idle and over-cap entries go. Each update appends its keys; a key updated again leaves a
    stale entry behind, skipped (and dropped) when reached, and the whole is rebuilt once stale
    entries outnumber live ones. Taking k keys costs about k, not the table's size.
    `held()`: the live keys and the version each was last updated at; `count()`: how many."""

    def __init__(self, held: Callable[[], tuple[np.ndarray, np.ndarray]], count: Callable[[], int]):
        self.held, self.count = held, count
        self.buckets: deque[tuple[int, np.ndarray]] = deque()
        self.size = 0

    def add(self, version: int, keys: np.ndarray) -> None:
        if len(keys):
            self.buckets.append((version, np.array(keys, np.int64)))
            self.size += len(keys)
            if self.size > 2 * self.count() + MIN_CAPACITY:  # stale entries pile up
                self.rebuild()

    def take(self, live: Callable[[np.ndarray, int], np.ndarray], tiebreak: Callable[[np.ndarray], np.ndarray],
             until: int | None = None, count: int | None = None) -> np.ndarray:
        """Remove and return the oldest keys still live (`live(keys, version)`: a bool mask):
        all last updated at versions <= `until`, or the `count` oldest (among keys of one
        version, the lowest `tiebreak(keys)` first)."""
        out, need = [], count
        while self.buckets and (need is None or need > 0):
            version, keys = self.buckets[0]
            if until is not None and version > until:
                break
            self.buckets.popleft()
            self.size -= len(keys)
            keys = keys[live(keys, version)]
            if need is not None and len(keys) > need:
                keys = keys[np.argsort(tiebreak(keys), kind="stable")]
                self.buckets.appendleft((version, keys[need:]))
                self.size += len(keys) - need
                keys = keys[:need]
            out.append(keys)
            if need is not None:
                need -= len(keys)
        return np.concatenate(out) if out else np.empty(0, np.int64)

    def rebuild(self) -> None:
        """From the keys live now (after a restore, say)."""
        keys, versions = self.held()
        order = np.argsort(versions, kind="stable")
        keys, versions = keys[order], versions[order]
        starts = np.flatnonzero(np.r_[True, versions[1:] != versions[:-1]]) if len(keys) else []
        self.buckets = deque((int(versions[a]), keys[a:b]) for a, b in zip(starts, [*starts[1:], len(keys)]))
        self.size = len(keys)


def _grown(column, used: int, capacity: int):
    """A numpy array or torch tensor with `capacity` rows, its first `used` copied."""
    shape = (capacity, *column.shape[1:])
    out = np.zeros(shape, column.dtype) if isinstance(column, np.ndarray) else torch.empty(shape, dtype=column.dtype)
    out[:used] = column[:used]
    return out


class Slots:
    """Integer slots of a pool, handed out and given back (reused first). When the pool must
    grow, `grow(used, capacity)` makes the owner's columns that large (doubling)."""

    def __init__(self, grow: Callable[[int, int], None]):
        self.grow = grow
        self.used = 0  # slots handed out (in use or given back)
        self.capacity = 0
        self.free = np.empty(0, np.int64)

    def take(self, n: int) -> np.ndarray:
        reuse = min(n, len(self.free))
        slots = self.free[len(self.free) - reuse:]
        self.free = self.free[:len(self.free) - reuse]
        more = n - reuse
        if more:
            if self.used + more > self.capacity:
                capacity = max(MIN_CAPACITY, 2 * self.capacity, self.used + more)
                self.grow(self.used, capacity)
                self.capacity = capacity
            slots = np.concatenate([slots, np.arange(self.used, self.used + more, dtype=np.int64)])
            self.used += more
        return slots

    def give_back(self, slots: np.ndarray) -> None:
        self.free = np.concatenate([self.free, slots])


class Table:
    """One table's rows on one shard. Not thread-safe: the TableSet's lock guards it."""

    def __init__(self, spec: TableSpec):
        self.spec = spec
        self.index = IdIndex()
        self.values = torch.empty(0, spec.dim)
        self.state = {name: torch.empty((0,) if scalar else (0, spec.dim)) for name, scalar in self._state_names()}
        self.row_id = np.empty(0, np.int64)      # the id each row holds
        self.alive = np.empty(0, bool)           # rows holding an id now
        self.touched = np.empty(0, np.int64)     # the table version of each row's last update
        self.pool = Slots(self._grow_rows)       # the rows
        self.version = 0                         # updates applied (lazy adam's step; eviction's clock)
        self.pending = IdIndex()                 # admission: id -> slot of its count
        self.pending_count = np.zeros(0, np.int64)    # per slot: pushes that carried the id (-1: free)
        self.pending_touched = np.zeros(0, np.int64)  # per slot: the version it was last counted at
        self.pending_id = np.zeros(0, np.int64)       # per slot: the id
        self.pending_slots = Slots(self._grow_pending)
        self.counters: Counter[str] = Counter()
        self.recent = Recency(self._held_rows, lambda: self.rows)  # rows by last update (eviction's order)
        self.pending_recent = Recency(self._held_slots, lambda: len(self.pending))  # admission slots by last count

    # -- storage ------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.index)

    def _state_names(self) -> tuple[tuple[str, bool], ...]:
        """(name, per-row scalar) of the optimizer's state pools."""
        return {"sgd": (), "adagrad": (("sum", False),), "rowwise_adagrad": (("sum", True),),
                "lazy_adam": (("exp_avg", False), ("exp_avg_sq", False))}[self.spec.optimizer]

    def _grow_rows(self, used: int, capacity: int) -> None:
        self.values = _grown(self.values, used, capacity)
        self.state = {name: _grown(t, used, capacity) for name, t in self.state.items()}
        self.row_id, self.alive, self.touched = (_grown(a, used, capacity) for a in (self.row_id, self.alive, self.touched))

    def _grow_pending(self, used: int, capacity: int) -> None:
        self.pending_count, self.pending_touched, self.pending_id = (
            _grown(a, used, capacity) for a in (self.pending_count, self.pending_touched, self.pending_id))

    def _create(self, ids: np.ndarray) -> np.ndarray:
        if not len(ids):
            return np.empty(0, np.int64)
        rows = self.pool.take(len(ids))
        t = torch.from_numpy(rows)
        self.values[t] = init_rows(self.spec, ids)
        for name, _ in self._state_names():
            self.state[name][t] = self.spec.initial_accumulator if name == "sum" else 0.0
        self.row_id[rows] = ids
        self.alive[rows] = True
        self.touched[rows] = self.version
        self.index.insert(ids, rows)
        self.counters["created"] += len(ids)
        return rows

    def _evict(self, slots: np.ndarray, rows: np.ndarray, why: str) -> None:
        self.index.remove_slots(slots)
        self.alive[rows] = False
        self.pool.give_back(rows)
        self.counters[why] += len(rows)

    def live_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of every row held, in row order."""
        rows = np.flatnonzero(self.alive[:self.pool.used])
        return self.row_id[rows], rows

    # -- reads --------------------------------------------------------------------------------
    def read(self, ids: np.ndarray) -> torch.Tensor:
        """The rows of `ids` (float32 [n, dim]); an id without a row reads as its init."""
        rows, _ = self.index.find(ids)
        held = rows >= 0
        out = torch.empty(len(ids), self.spec.dim)
        if held.all():
            torch.index_select(self.values, 0, torch.from_numpy(rows), out=out)
        else:
            h = torch.from_numpy(held)
            out[h] = self.values[torch.from_numpy(rows[held])]
            out[~h] = init_rows(self.spec, ids[~held])
        self.counters["rows_pulled"] += len(ids)
        return out

    # -- updates ------------------------------------------------------------------------------
    def _admit(self, ids: np.ndarray, seen: np.ndarray) -> np.ndarray:
        """Of ids without a row, which reach admit_after now (bool mask); the rest are counted."""
        if self.spec.admit_after <= 1:
            return np.ones(len(ids), bool)
        slots, _ = self.pending.find(ids)
        new = slots < 0
        if new.any():
            fresh = self.pending_slots.take(int(new.sum()))
            self.pending_count[fresh] = 0
            self.pending_id[fresh] = ids[new]
            self.pending.insert(ids[new], fresh)
            slots[new] = fresh
        self.pending_count[slots] += seen
        self.pending_touched[slots] = self.version
        admitted = self.pending_count[slots] >= self.spec.admit_after
        self._forget_pending(slots[admitted])
        self.pending_recent.add(self.version, slots[~admitted])
        if len(self.pending) > PENDING_CAP:  # the least recently counted go (a long tail of ids seen once)
            gone = self.pending_recent.take(self._pending_live, self.pending_id.__getitem__,
                                            count=len(self.pending) - PENDING_CAP)
            self._forget_pending(gone)
            self.counters["pending_forgotten"] += len(gone)
        return admitted

    def _forget_pending(self, slots: np.ndarray) -> None:
        if len(slots):
            _, where = self.pending.find(self.pending_id[slots])
            self.pending.remove_slots(where)
            self.pending_count[slots] = -1  # free: stale entries of it are skipped
            self.pending_slots.give_back(slots)

    def _pending_live(self, slots: np.ndarray, version: int) -> np.ndarray:
        return (self.pending_count[slots] >= 0) & (self.pending_touched[slots] == version)

    def _row_live(self, rows: np.ndarray, version: int) -> np.ndarray:
        return self.alive[rows] & (self.touched[rows] == version)

    def apply(self, version: int, ids: np.ndarray, grads: torch.Tensor, seen: np.ndarray) -> None:
        """Update `version` of the tables: `grads` (float32 [n, dim]) for distinct `ids`, each id
        carried by `seen` pushes. Rows missing are created (admission permitting), the optimizer
        steps the rows touched, then idle and over-cap rows are evicted."""
        self.version = version
        if len(ids):
            rows, _ = self.index.find(ids)
            absent = rows < 0
            if absent.any():
                admitted = self._admit(ids[absent], seen[absent])
                where = np.flatnonzero(absent)
                self.counters["admission_dropped"] += int((~admitted).sum())
                rows[where[admitted]] = self._create(ids[where[admitted]])
            keep = rows >= 0
            if not keep.all():
                rows, grads = rows[keep], grads[torch.from_numpy(keep)]
            if len(rows):
                self._step(torch.from_numpy(rows), grads)
            self.touched[rows] = self.version
            if self.spec.evict_after or self.spec.max_rows:
                self.recent.add(self.version, rows)
            self.counters["rows_pushed"] += len(ids)
        self._expire()
        self._cap()

    def idle(self, version: int) -> None:
        """An update of the tables that carries no row of this one."""
        self.apply(version, np.empty(0, np.int64), torch.empty(0, self.spec.dim), np.empty(0, np.int64))

    def _step(self, rows: torch.Tensor, g: torch.Tensor) -> None:
        spec, lr, eps = self.spec, self.spec.lr, self.spec.epsilon
        p = self.values
        if spec.optimizer == "sgd":  # torch.optim.SGD on a sparse gradient: p.add_(g, alpha=-lr)
            p.index_add_(0, rows, g, alpha=-lr)  # (rows are distinct)
        elif spec.optimizer == "adagrad":  # torch.optim.Adagrad, sparse branch (lr_decay 0)
            s = self.state["sum"]
            total = s[rows].add(g.pow(2))
            s[rows] = total
            p[rows] = p[rows].add(g / total.sqrt().add(eps), alpha=-lr)
        elif spec.optimizer == "rowwise_adagrad":  # FBGEMM's: one accumulator per row
            s = self.state["sum"]
            total = s[rows] + g.pow(2).mean(dim=1)
            s[rows] = total
            p[rows] = p[rows] - (lr / (total.sqrt() + eps)).unsqueeze(1) * g
        else:  # lazy adam: torch.optim.SparseAdam, the step counted per table update
            m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
            b1, b2 = spec.beta1, spec.beta2
            old_m, old_v = m[rows], v[rows]
            m_up = g.sub(old_m).mul_(1 - b1)
            v_up = g.pow(2).sub_(old_v).mul_(1 - b2)
            numer = m_up.add(old_m)
            m[rows] = numer
            denom = v_up.add_(old_v)
            v[rows] = denom
            denom = denom.sqrt_().add_(eps)
            step = self.version
            bias1, bias2 = 1 - b1 ** step, 1 - b2 ** step
            step_size = lr * (bias2 ** 0.5) / bias1
            p[rows] = p[rows].add(numer.div_(denom).mul_(-step_size))

    def _expire(self) -> None:
        """Evict rows untouched by evict_after updates, and forget admission counts as idle."""
        t = self.spec.evict_after
        if not t:
            return
        rows = self.recent.take(self._row_live, self.row_id.__getitem__, until=self.version - t)
        if len(rows):
            _, slots = self.index.find(self.row_id[rows])
            self._evict(slots, rows, "evicted_idle")
        self._forget_pending(self.pending_recent.take(self._pending_live, self.pending_id.__getitem__,
                                                      until=self.version - t))

    def _cap(self) -> None:
        """Over max_rows: evict the least recently updated rows (the lowest ids first among
        rows updated last at the same version, whatever their place in the pool)."""
        over = self.rows - self.spec.max_rows
        if not self.spec.max_rows or over <= 0:
            return
        rows = self.recent.take(self._row_live, self.row_id.__getitem__, count=over)
        _, slots = self.index.find(self.row_id[rows])
        self._evict(slots, rows, "evicted_lru")

    def stats(self) -> dict:
        return {"rows": self.rows, "version": self.version, "pending": len(self.pending),
                **{k: self.counters[k] for k in TABLE_COUNTERS}}

    # -- checkpoints (ps.server.checkpoint writes and reads these a chunk at a time) -----------
    def row_bytes(self) -> int:
        return 4 * self.spec.dim * (1 + sum(1 for _, scalar in self._state_names() if not scalar)) + 32

    def export_rows(self, chunk_rows: int):
        """The rows held, `chunk_rows` at a time: {ids, values, touched, state/<name>} copies."""
        ids, rows = self.live_rows()
        for start in range(0, len(rows), chunk_rows):
            r = rows[start:start + chunk_rows]
            t = torch.from_numpy(r)
            out = {"ids": torch.from_numpy(ids[start:start + chunk_rows].copy()), "values": self.values[t].clone(),
                   "touched": torch.from_numpy(self.touched[r].copy())}
            out.update({f"state/{name}": self.state[name][t].clone() for name, _ in self._state_names()})
            yield out

    def export_pending(self, chunk_rows: int):
        """Admission counts, `chunk_rows` at a time: {ids, count, touched}."""
        ids, slots = self.pending.items()
        for start in range(0, len(ids), chunk_rows):
            s = slots[start:start + chunk_rows]
            yield {"ids": torch.from_numpy(ids[start:start + chunk_rows].copy()),
                   "count": torch.from_numpy(self.pending_count[s].copy()),
                   "touched": torch.from_numpy(self.pending_touched[s].copy())}

    def load_rows(self, chunk: dict[str, torch.Tensor]) -> None:
        """Take rows exported by `export_rows` (ValueError for a chunk that does not fit)."""
        ids = chunk["ids"].numpy().astype(np.int64)
        n = len(ids)
        names = {f"state/{name}" for name, _ in self._state_names()}
        if (set(chunk) != {"ids", "values", "touched"} | names or tuple(chunk["values"].shape) != (n, self.spec.dim)
                or len(chunk["touched"]) != n or len(np.unique(ids)) != n or (self.index.find(ids)[0] >= 0).any()):
            raise ValueError(f"a chunk of table {self.spec.name!r} does not fit it (fields, shapes or repeated ids)")
        if not n:
            return
        rows = self.pool.take(n)
        t = torch.from_numpy(rows)
        self.values[t] = chunk["values"].to(torch.float32)
        for name, scalar in self._state_names():
            state = chunk[f"state/{name}"].to(torch.float32)
            if tuple(state.shape) != ((n,) if scalar else (n, self.spec.dim)):
                raise ValueError(f"a chunk of table {self.spec.name!r} has state {name!r} of shape {tuple(state.shape)}")
            self.state[name][t] = state
        self.row_id[rows] = ids
        self.alive[rows] = True
        self.touched[rows] = chunk["touched"].numpy()
        self.index.insert(ids, rows)

    def load_pending(self, chunk: dict[str, torch.Tensor]) -> None:
        ids = chunk["ids"].numpy().astype(np.int64)
        if set(chunk) != {"ids", "count", "touched"} or len(chunk["count"]) != len(ids) or len(chunk["touched"]) != len(ids):
            raise ValueError(f"an admission chunk of table {self.spec.name!r} does not fit it")
        slots = self.pending_slots.take(len(ids))
        self.pending_count[slots] = chunk["count"].numpy()
        self.pending_touched[slots] = chunk["touched"].numpy()
        self.pending_id[slots] = ids
        self.pending.insert(ids, slots)

    def reindex(self) -> None:
        """After rows and counts were loaded: the eviction order from their last updates."""
        self.recent.rebuild()
        self.pending_recent.rebuild()

    def _held_rows(self) -> tuple[np.ndarray, np.ndarray]:
        _, rows = self.live_rows()
        return rows, self.touched[rows]

    def _held_slots(self) -> tuple[np.ndarray, np.ndarray]:
        _, slots = self.pending.items()
        return slots, self.pending_touched[slots]


@dataclass
class RowsIn:
    """One table's part of a push, validated: distinct ids, their gradients, pushes per id."""

    table: str
    ids: np.ndarray
    grads: torch.Tensor


def _merge(parts: list[tuple[np.ndarray, torch.Tensor, np.ndarray]]) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Parts of a sync step (distinct ids, summed gradients, pushes per id) as one."""
    if len(parts) == 1:
        return parts[0]
    return coalesce(np.concatenate([i for i, _, _ in parts]), torch.cat([g for _, g, _ in parts]),
                    np.concatenate([c for _, _, c in parts]))


class TableSet:
    """The tables of one shard, their clocks and their consistency mode. Thread-safe: one lock
    guards everything here. It never takes the dense shard's lock (the shard calls `departed`
    holding its own), so the lock order is shard -> tables."""

    def __init__(self, shard, mode: str, staleness: int):
        self.shard = shard
        self.policy = make_policy(mode, staleness, shard.cfg.backup_workers if mode == "sync" else 0)
        self.tables: dict[str, Table] = {}
        self._lock = threading.Condition(threading.Lock())
        self._clock: dict[str, int] = {}  # the next table clock each worker pushes
        self.version = 0  # table steps (sync) or pushes applied (async, ssp)
        # sync: per step (clock) not applied yet, its pushes and their rows by table. A worker may
        # push a later step to a shard whose current step still waits (its batch read no row
        # there, so nothing held it back): that push waits here for its step.
        self._steps: dict[int, _Step] = {}
        # Pulls waiting for the tables' state to move. Their own lock, never held for long: a
        # waiting pull is registered and withdrawn from the event loop, which must not wait for
        # the tables' lock (a checkpoint holds it while it writes).
        self._waiters: list[Callable[[], None]] = []
        self._wlock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.staleness_hist: Counter[int] = Counter()
        self._restarted = False  # restored from a checkpoint (or empty after a restart): see arrive
        self._pushed_since: set[str] = set()  # workers that pushed tables here since

    # -- declaration --------------------------------------------------------------------------
    def declare(self, specs: Sequence[TableSpec]) -> bool:
        """Create the tables (first worker), or check that they are the ones held. True if created."""
        with self._lock:
            names = [s.name for s in specs]
            if len(set(names)) != len(names):
                raise InvalidArgument(f"tables declared more than once: {sorted(n for n in set(names) if names.count(n) > 1)}")
            if not specs:
                raise InvalidArgument("a declaration names no table")
            if self.tables:
                held = {n: t.spec for n, t in self.tables.items()}
                if held != {s.name: s for s in specs}:
                    diff = sorted(set(held) ^ set(names)) or [s.name for s in specs if held.get(s.name) != s]
                    raise PlanMismatch(f"tables {diff} differ from the ones shard {self.shard.cfg.shard_id} holds: "
                                       "every worker must declare the same tables")
                return False
            self.tables = {s.name: Table(s) for s in specs}
            log.info("shard %d: tables %s (%s mode)", self.shard.cfg.shard_id, names, self.policy.name)
            return True

    # -- helpers (lock held) ------------------------------------------------------------------
    def _view(self) -> View:
        """The tables' version and the active workers' table clocks. A worker that has pushed no
        table yet counts (sync) as not done with the current step, whatever its dense clock (its
        dense push may come first); in async and ssp, at its dense clock."""
        active = self.shard.active_clocks()
        sync = self.policy.name == "sync"
        clocks = tuple(self._clock.get(w, self.version if sync else c) for w, c in active.items())
        return View(self.version, clocks, self.shard.quorum)

    def _wake(self) -> None:
        with self._wlock:
            waiters, self._waiters = self._waiters, []
        for wake in waiters:
            wake()

    def table(self, name: str) -> Table:
        """The table `name`; UnknownTable (NOT_FOUND) if it was never declared here."""
        table = self.tables.get(name)
        if table is None:
            raise UnknownTable(f"no table {name!r} on shard {self.shard.cfg.shard_id} "
                                  f"(tables: {sorted(self.tables)[:8]}); declare it first")
        return table

    def _maybe_complete(self) -> None:
        """Apply each sync step once its pushes are all in (a later one may be complete already).
        Steps no active worker will push again (every one is past them, none of their pushes is
        here: lost with a restart from an older checkpoint) are skipped, counted as lost."""
        while self.policy.name == "sync":
            step = self._steps.get(self.version)
            view = self._view()
            if step is None and view.quorum and view.clocks and min(view.clocks) > self.version:
                later = [c for c in self._steps if c > self.version]
                target = min([min(view.clocks), *later])
                log.warning("shard %d: table steps %d..%d have no push left (lost in a restart); skipping them",
                            self.shard.cfg.shard_id, self.version, target)
                self.counters["lost_steps"] += target - self.version
                self.version = target
                for table in self.tables.values():
                    table.idle(target)
                self._wake()
                continue
            if step is None or not self.policy.step_ready(view, step.pushes):
                return
            del self._steps[self.version]
            for name, table in self.tables.items():
                parts = step.rows.get(name, [])
                if parts:
                    ids, grads, seen = _merge(parts)
                    table.apply(self.version + 1, ids, grads / step.pushes, seen)
                else:
                    table.idle(self.version + 1)
            self.version += 1
            self.staleness_hist[0] += 1
            self._wake()

    # -- requests -----------------------------------------------------------------------------
    def check(self, entries: Sequence[RowsIn]) -> None:
        """Validate a request's rows before anything changes: tables known and each named once,
        ids allowed, gradients (a push's) one finite row per id."""
        seen = set()
        for e in entries:
            table = self.table(e.table)
            if e.table in seen:
                raise InvalidArgument(f"table {e.table!r} appears more than once in a request")
            seen.add(e.table)
            table.spec.check_ids(e.ids)
            if e.grads is not None:
                table.spec.check_grads(len(e.ids), e.grads)

    def ready_or_wait(self, worker_id: str, clock: int, wake: Callable[[], None]) -> bool:
        """True if a worker at `clock` may read the tables now (an observer always may); else
        `wake` is registered, to be called when the tables' state moves."""
        if not worker_id:
            return True
        self.shard.heartbeat(worker_id)  # (UnknownWorker unless registered)
        with self._wlock:  # (not the tables' lock: see _waiters; the version is read after it moved)
            if self.shard.stopped:
                raise Unavailable(f"shard {self.shard.cfg.shard_id} is stopping")
            if self.policy.pull_ready(clock, self._view()):
                return True
            self._waiters.append(wake)
            return False

    def forget(self, wake: Callable[[], None]) -> None:
        with self._wlock:
            if wake in self._waiters:
                self._waiters.remove(wake)

    def read(self, entries: Sequence[RowsIn]) -> tuple[list[torch.Tensor], int]:
        with self._lock:
            self.check(entries)
            self.counters["pulls"] += 1
            return [self.tables[e.table].read(e.ids) for e in entries], self.version

    def push(self, worker_id: str, clock: int, base_version: int, entries: Sequence[RowsIn]) -> tuple[str, int, int]:
        """A worker's table push for `clock`: (outcome, version, staleness). Retries (a clock
        already taken from this worker) are DUPLICATE and change nothing."""
        self.shard.heartbeat(worker_id)  # (UnknownWorker unless registered)
        with self._lock:
            self.check(entries)
            known = self._clock.get(worker_id)
            if known is not None and clock < known:
                self.counters["duplicates"] += 1
                return "DUPLICATE", self.version, 0
            verdict = self.policy.on_push(clock, self._view())
            if verdict is Verdict.LATE:
                self._clock[worker_id] = clock + 1
                self.counters["dropped"] += 1
                return "DROPPED", self.version, 0
            if verdict is Verdict.AHEAD and clock - self.version > MAX_AHEAD:
                raise StepConflict(f"table push for clock {clock} is more than {MAX_AHEAD} steps ahead of the "
                                   f"tables' step {self.version} on shard {self.shard.cfg.shard_id}")
            self._clock[worker_id] = clock + 1
            self._pushed_since.add(worker_id)
            self.counters["pushes"] += 1
            if verdict in (Verdict.ACCUMULATE, Verdict.AHEAD):
                step = self._steps.setdefault(clock, _Step())
                for e in entries:
                    ids, grads, _ = coalesce(e.ids, e.grads)
                    parts = step.rows.setdefault(e.table, [])
                    parts.append((ids, grads, np.ones(len(ids), np.int64)))
                    if len(parts) >= MERGE_PARTS:  # a step's sum kept about as large as the rows it touches
                        parts[:] = [_merge(parts)]
                step.pushes += 1
                self._maybe_complete()
                return "ACCUMULATED", self.version, 0
            staleness = max(0, self.version - base_version)
            self.version += 1
            for e in entries:
                ids, grads, _ = coalesce(e.ids, e.grads)
                self.tables[e.table].apply(self.version, ids, grads, np.ones(len(ids), np.int64))
            for name, table in self.tables.items():  # every table counts the update (its clock)
                if name not in {e.table for e in entries}:
                    table.idle(self.version)
            self.staleness_hist[staleness] += 1
            self._wake()
            return "APPLIED", self.version, staleness

    def arrive(self, worker_id: str, clock: int) -> None:
        """A sync pull at `clock` after this shard restarted, from a worker that has pushed no
        table here since: it pushed every step below `clock` (the trainer pushes a step's rows,
        and has them acknowledged, before it reads the next step's), so a table clock below that
        means pushes the checkpoint lacks. They are given up, so that the steps they belonged
        to can be skipped instead of waited for forever. Never on a shard that did not restart,
        nor for a worker that pushed since: a pull may run ahead of its own push (a prefetch)."""
        if self.policy.name != "sync" or not worker_id or not self._restarted or worker_id in self._pushed_since:
            return
        with self._lock:
            known = self._clock.get(worker_id)
            if (known is None or known < clock) and self.version < clock <= self.version + MAX_AHEAD:
                self.counters["lost_pushes"] += clock - (self.version if known is None else known)
                self._clock[worker_id] = clock
                self._maybe_complete()

    def settle(self, wait: bool = True) -> None:
        """The shard's membership moved (a worker left, was evicted or registered; the quorum was
        reached, or the wait for workers after a restore ended): steps may complete, waiting
        pulls look again. Called without the shard's lock (never under it: a checkpoint may hold
        the tables' lock for long; `wait=False`: do nothing if it is held, the caller comes back).
        A departed worker's table clock is kept, so its retries stay duplicates should it come back."""
        if not self._lock.acquire(blocking=wait):
            return
        try:
            self._maybe_complete()
        finally:
            self._lock.release()
        self._wake()

    def stop(self) -> None:
        self._wake()

    def stats(self) -> dict:
        """Per table, its counts (read without the lock, so never held up by a checkpoint: each
        number is one that was true, the set of them maybe not quite at one instant)."""
        return {name: t.stats() for name, t in list(self.tables.items())}

    # -- checkpoints --------------------------------------------------------------------------
    @contextlib.contextmanager
    def frozen(self):
        """Hold the tables still (their lock) while a checkpoint writes them; yields the
        bookkeeping to save beside the rows (JSON-able) and each table's partial sync sums."""
        with self._lock:
            acc: dict[str, dict[str, torch.Tensor]] = {}
            for clock, step in self._steps.items():
                for name, parts in step.rows.items():
                    if parts:
                        ids, grads, seen = _merge(parts)
                        acc.setdefault(name, {}).update({f"ids/{clock}": torch.from_numpy(ids),
                                                         f"grads/{clock}": grads,
                                                         f"seen/{clock}": torch.from_numpy(seen)})
            yield {"mode": self.policy.name, "version": self.version, "clocks": dict(self._clock),
                   "step_pushes": {str(c): st.pushes for c, st in self._steps.items()},
                   "counters": dict(self.counters),
                   "staleness_histogram": {str(k): v for k, v in self.staleness_hist.items()}}, acc

    def restarted(self) -> None:
        """The shard restarted (from a checkpoint, or empty): see `arrive`. (No lock: the shard
        calls it holding its own; two attribute writes under the GIL.)"""
        self._pushed_since = set()
        self._restarted = True

    def restore(self, saved: "SavedTables") -> None:
        """Resume from a checkpoint's tables (before serving)."""
        with self._lock:
            self.tables = saved.tables
            self.version = saved.version
            self._clock = dict(saved.clocks)
            self._steps = {clock: _Step(pushes) for clock, pushes in saved.step_pushes.items()}
            for name, tensors in saved.acc.items():
                for key, ids in tensors.items():
                    kind, _, clock = key.partition("/")
                    if kind == "ids":
                        self._steps[int(clock)].rows[name] = [(ids.numpy().astype(np.int64),
                                                               tensors[f"grads/{clock}"].to(torch.float32),
                                                               tensors[f"seen/{clock}"].numpy().astype(np.int64))]
            self.counters = Counter(saved.counters)
            self.staleness_hist = Counter(saved.staleness_histogram)


@dataclass
class _Step:
    """A sync step of the tables not applied yet."""

    pushes: int = 0
    rows: dict[str, list[tuple[np.ndarray, torch.Tensor, np.ndarray]]] = field(default_factory=dict)  # (ids, sums, pushes)


@dataclass
class SavedTables:
    """A checkpoint's tables, read back (ps.server.checkpoint)."""

    tables: dict[str, Table]
    version: int
    clocks: dict[str, int]
    step_pushes: dict[int, int]
    counters: dict[str, int]
    staleness_histogram: dict[int, int]
    acc: dict[str, dict[str, torch.Tensor]]
