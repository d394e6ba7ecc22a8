"""A shard's slices: fp32 master copies, their optimizer, sync accumulators and validation.

Not thread-safe on its own: `Shard` calls it under one lock. Every check runs before any
state changes, so a rejected request leaves the parameters exactly as they were.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch

from ps.config import OptimizerConfig
from ps.errors import InvalidArgument, UnknownKey
from ps.server.optim import SliceOptimizer


def _all_finite(t: torch.Tensor) -> bool:
    """A finite sum means every element is finite (NaN and Inf propagate); only when it is not
    (or overflowed) is the exact elementwise check needed. 10-20x faster than isfinite().all()."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


class ParamStore:
    def __init__(self) -> None:
        self.params: dict[str, torch.Tensor] = {}
        self.optimizer: SliceOptimizer | None = None
        self._acc: dict[str, torch.Tensor] = {}
        self._acc_count: dict[str, int] = {}
        self.slice_lengths: list[int] = []  # elements of each slice held (bounds what a request may expand to)

    @property
    def initialized(self) -> bool:
        return self.optimizer is not None

    def num_elements(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def init(self, values: Mapping[str, torch.Tensor], optimizer: OptimizerConfig) -> None:
        self.params = {k: v.detach().to(torch.float32).clone().requires_grad_(True) for k, v in values.items()}
        self.optimizer = SliceOptimizer(optimizer, self.params)
        self.slice_lengths = [p.numel() for p in self.params.values()]
        self._acc.clear()
        self._acc_count.clear()

    def check_keys(self, keys: Iterable[str]) -> None:
        for key in keys:
            if key not in self.params:
                raise UnknownKey(f"key {key!r} is not held by this shard")

    def validate(self, tensors: Sequence[tuple[str, torch.Tensor]], what: str = "gradient") -> dict[str, torch.Tensor]:
        """Check keys, shapes and finiteness; return fp32 tensors by key."""
        out: dict[str, torch.Tensor] = {}
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
        return out

    def apply(self, grads: Mapping[str, torch.Tensor], lr_scale: float = 1.0) -> None:
        assert self.optimizer is not None
        with torch.no_grad():
            self.optimizer.step(grads, lr_scale)

    def accumulate(self, grads: Mapping[str, torch.Tensor]) -> None:
        for key, g in grads.items():
            if key in self._acc:
                self._acc[key].add_(g)
                self._acc_count[key] += 1
            else:
                self._acc[key] = g.clone()
                self._acc_count[key] = 1

    def accumulated(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Copies of the current sync step's partial sums and their counts (for checkpoints)."""
        return {k: g.clone() for k, g in self._acc.items()}, dict(self._acc_count)

    def restore_accumulated(self, acc: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> None:
        if set(acc) != set(counts) or not set(acc) <= set(self.params):
            raise KeyError("accumulated sums and counts must name the same slices of this shard")
        self._acc = {k: g.clone() for k, g in acc.items()}
        self._acc_count = dict(counts)

    def clear_accumulated(self) -> None:
        self._acc.clear()
        self._acc_count.clear()

    def apply_accumulated(self) -> None:
        """Apply the average of each key's accumulated gradients (one sync step) and reset."""
        grads = {k: g.div_(self._acc_count[k]) for k, g in self._acc.items()}
        self.apply(grads)
        self._acc.clear()
        self._acc_count.clear()

    def read(self, keys: Iterable[str], copy: bool = True) -> list[tuple[str, bytes | memoryview]]:
        """The raw fp32 (little-endian) bytes of each slice: one copy, taken under the shard lock,
        so the slices are consistent with each other. copy=False: read-only views of the live
        values, valid only while the lock is held."""
        if copy:
            return [(k, self.params[k].detach().numpy().tobytes()) for k in keys]
        return [(k, memoryview(self.params[k].detach().numpy()).cast("B").toreadonly()) for k in keys]
