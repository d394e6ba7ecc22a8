"""A shard's slices: fp32 master copies, their optimizer, sync accumulators and validation.

Each slice has a lock of its own: updates of different slices (two workers' pushes, or the
slices of one large push) run at once, and a read of a slice never sees half an update of it.
`validate` reads only what `init` fixed (keys and shapes), so it needs no lock at all. Every
check runs before any state changes, so a rejected request leaves the parameters as they were.

With SGD and momentum, a slice's memory is never written while a reader holds it: an update
made while one does (copy on write) writes the new values into another buffer (the one before
last, when no reader still holds it) and the parameter takes that buffer; otherwise it updates
in place (a third faster: no extra stream of memory). So a reader may keep the views `reading`
gives after the locks are released (`immutable`), and a pull answer is sent from the slices
themselves, with no copy. Adam updates in place (torch.optim's own step): its readers copy.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ps.config import OptimizerConfig
from ps.buffers import Leases
from ps.errors import InvalidArgument, UnknownKey
from ps.server.optim import SliceOptimizer


def _all_finite(t: torch.Tensor) -> bool:
    """A finite sum means every element is finite (NaN and Inf propagate); only when it is not
    (or overflowed) is the exact elementwise check needed. 10-20x faster than isfinite().all()."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


class ParamStore:
    def __init__(self, alloc: Callable[[int], np.ndarray] | None = None) -> None:
        self.params: dict[str, torch.Tensor] = {}
        self.optimizer: SliceOptimizer | None = None
        self._locks: dict[str, threading.Lock] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._acc_count: dict[str, int] = {}
        self.slice_lengths: list[int] = []  # elements of each slice held (bounds what a request may expand to)
        self.elements = 0
        # Per slice, the buffers of its current and previous values (immutable slices; see above).
        self._live: dict[str, np.ndarray] = {}
        self._spare: dict[str, np.ndarray | None] = {}
        self._leases = Leases()  # which of those buffers views kept past `reading` hold
        self.immutable = False
        self._alloc: Callable[[int], np.ndarray] = alloc or (lambda n: np.empty(n, np.float32))

    @property
    def allocator(self) -> Callable[[int], np.ndarray]:
        return self._alloc

    def allocate_with(self, alloc: Callable[[int], np.ndarray]) -> None:
        """New slice buffers come from `alloc(n)` (ps.shm.Arena.empty: shared memory co-located
        workers read pulls from); `move` takes a current slice there."""
        self._alloc = alloc

    def move(self, key: str) -> None:
        """Move a slice into a buffer of the allocator's (under its lock; readers keep what they hold)."""
        with self._locks[key], torch.no_grad():
            self._live[key] = self._buffer(self._live[key])
            self.params[key].set_(torch.from_numpy(self._live[key]))
            self._spare[key] = None

    def _buffer(self, values) -> np.ndarray:
        """A fresh buffer holding these values (a slice's: flat fp32)."""
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        out = self._alloc(flat.size)
        out[:] = flat
        return out

    @property
    def initialized(self) -> bool:
        return self.optimizer is not None

    def num_elements(self) -> int:
        return self.elements

    def init(self, values: Mapping[str, torch.Tensor], optimizer: OptimizerConfig) -> None:
        """Set the slices (before any other call, or with no other call running)."""
        self._live = {k: self._buffer(v.detach().to(torch.float32).contiguous().numpy()) for k, v in values.items()}
        self._spare = {k: None for k in self._live}
        # Each parameter is made from its buffer itself (a view of it would keep the buffer as its base).
        params = {k: torch.from_numpy(a).requires_grad_(True) for k, a in self._live.items()}
        self._locks = {k: threading.Lock() for k in params}
        self.slice_lengths = [p.numel() for p in params.values()]
        self.elements = sum(self.slice_lengths)
        self._acc.clear()
        self._acc_count.clear()
        self.params = params
        self.optimizer = SliceOptimizer(optimizer, params)
        self.immutable = self.optimizer.out_of_place

    def check_keys(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key not in self.params:
                raise UnknownKey(f"key {key!r} is not held by this shard")

    def validate(self, tensors: Sequence[tuple[str, torch.Tensor]], what: str = "gradient",
                 no_grad: Sequence[str] = ()) -> dict[str, torch.Tensor | None]:
        """Check keys, shapes and finiteness; return fp32 tensors by key, and None for each key of
        `no_grad` (the push covers it but has no gradient for it: it is not stepped). Needs no lock."""
        out: dict[str, torch.Tensor | None] = {}
        for key, t in tensors:
            if key in out:
                raise InvalidArgument(f"{what} for key {key!r} appears more than once in one push")
            if key not in self.params:
                raise UnknownKey(f"{what} key {key!r} is not held by this shard")
            want = self.params[key].shape
            if t.shape != want:
                raise InvalidArgument(f"{what} {key!r}: shape {list(t.shape)} must equal {list(want)}")
            t = t.to(torch.float32)
            if not _all_finite(t):
                raise InvalidArgument(f"{what} {key!r} holds NaN or Inf values; the push is rejected")
            out[key] = t
        for key in no_grad:
            if key in out:
                raise InvalidArgument(f"key {key!r} is named as having no gradient and appears in the push again")
            if key not in self.params:
                raise UnknownKey(f"no-gradient key {key!r} is not held by this shard")
            out[key] = None
        return out

    def apply(self, grads: Mapping[str, torch.Tensor | None], lr_scale: float = 1.0) -> None:
        """One optimizer step of each slice given a gradient, each under its slice's lock (a key
        without one, None, is left alone, as torch.optim skips a parameter whose grad is None)."""
        assert self.optimizer is not None
        for key, g in grads.items():
            if g is None:
                continue
            with self._locks[key]:
                self._step(key, g, lr_scale)

    def _step(self, key: str, grad: torch.Tensor, lr_scale: float = 1.0) -> None:
        """One optimizer step of a slice (its lock held): in place when no reader holds its
        memory (or the slices are not immutable: Adam); else copy on write, into its previous
        buffer when no reader holds that any more, so what the readers hold never changes."""
        if not self.immutable or not self._leases.held(self._live[key]):
            self.optimizer.step_one(key, grad, lr_scale)
            return
        spare, self._spare[key] = self._spare[key], None
        if spare is None or self._leases.held(spare):
            spare = self._alloc(self._live[key].size)
        self.optimizer.step_one(key, grad, lr_scale, out=torch.from_numpy(spare))
        self._spare[key], self._live[key] = self._live[key], spare

    def accumulate(self, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Add to the current sync step's sums (slice by slice; pushes add concurrently). A key
        without a gradient (None) counts as a worker's zero in the average (as in an all-reduce)
        but adds nothing; a key no push gave a gradient for is not stepped at all."""
        for key, g in grads.items():
            with self._locks[key]:
                self._acc_count[key] = self._acc_count.get(key, 0) + 1
                if g is None:
                    continue
                if key in self._acc:
                    self._acc[key].add_(g)
                else:
                    self._acc[key] = g.clone()

    def accumulated(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Copies of the current sync step's partial sums and their counts (for checkpoints)."""
        out = {}
        for key in list(self._acc):
            with self._locks[key]:
                out[key] = self._acc[key].clone()
        return out, dict(self._acc_count)

    def restore_accumulated(self, acc: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> None:
        if not set(acc) <= set(counts) <= set(self.params):
            raise KeyError("accumulated sums must have counts, and both must name slices of this shard")
        self._acc = {k: g.clone() for k, g in acc.items()}
        self._acc_count = dict(counts)

    def clear_accumulated(self) -> None:
        self._acc.clear()
        self._acc_count.clear()

    def apply_accumulated(self) -> None:
        """Apply the average of each key's accumulated gradients over the pushes that covered it
        (one sync step) and reset. Only keys some push gave a gradient for are stepped."""
        acc, counts = self._acc, self._acc_count
        self._acc, self._acc_count = {}, {}
        assert self.optimizer is not None
        for key, g in acc.items():
            with self._locks[key]:
                self._step(key, g.div_(counts[key]))

    @contextlib.contextmanager
    def reading(self, keys: Sequence[str], keep: bool = False):
        """Read-only views of the live fp32 bytes of these slices, inside a block which holds
        their locks (taken in key order; updates take one lock at a time, so this cannot
        deadlock): the slices read are consistent with each other. Valid inside the block;
        with `keep` and `immutable`, for as long as they are kept (an update while they are
        goes to another buffer); else copy what you keep."""
        locks = [self._locks[k] for k in sorted(set(keys))]
        lend = keep and self.immutable
        for lock in locks:
            lock.acquire()
        try:
            yield [(k, (self._leases.lend(self._live[k]) if lend else memoryview(self._live[k])).cast("B").toreadonly())
                   for k in keys]
        finally:
            for lock in reversed(locks):
                lock.release()

    def read(self, keys: Sequence[str]) -> list[tuple[str, bytes]]:
        """Copies of the raw fp32 (little-endian) bytes of each slice, read consistently."""
        with self.reading(keys) as views:
            return [(k, v.tobytes()) for k, v in views]
