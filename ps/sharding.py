"""The placement plan: which contiguous slice of which parameter lives on which server.

Workers and servers compute the same plan from (names, shapes, dtypes, number of servers,
partition size); its fingerprint lets a server refuse a worker whose plan differs.

    >>> plan = make_plan([ParamSpec("w", (1024, 1024), "float32")], num_shards=2,
    ...                  partition_bytes=1 << 20)
    >>> [s.key for s in plan.slices_for(0)]
    ['w#0', 'w#2']
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterable, Mapping, Sequence

import torch

from ps.config import check_partition_bytes
from ps.errors import InvalidArgument

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_PLAN_VERSION = "ps-plan-v1"
MAX_SLICES = 1 << 20


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise InvalidArgument(f"dtype ({dtype}) must be one of {sorted(DTYPES)}")
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class ParamSpec:
    """A named parameter tensor as the plan sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if not self.name or "#" in self.name:
            raise InvalidArgument(f"parameter name ({self.name!r}) must be non-empty and contain no '#'")
        if any(d < 0 for d in self.shape):
            raise InvalidArgument(f"shape of {self.name} ({self.shape}) must have no negative dimension")
        if self.dtype not in DTYPES:
            raise InvalidArgument(f"dtype of {self.name} ({self.dtype!r}) must be one of {sorted(DTYPES)}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Slice:
    """Elements [start, start + length) of the flattened parameter `name`, held by `shard`."""

    key: str
    name: str
    start: int
    length: int
    shard: int


@dataclass(frozen=True)
class Plan:
    params: tuple[ParamSpec, ...]
    num_shards: int
    partition_bytes: int
    slices: tuple[Slice, ...] = field(repr=False)

    @cached_property
    def fingerprint(self) -> str:
        doc = {
            "version": _PLAN_VERSION,
            "params": [[p.name, list(p.shape), p.dtype] for p in self.params],
            "num_shards": self.num_shards,
            "partition_bytes": self.partition_bytes,
        }
        return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:16]

    @cached_property
    def _by_shard(self) -> list[list[Slice]]:
        shards: list[list[Slice]] = [[] for _ in range(self.num_shards)]
        for s in self.slices:
            shards[s.shard].append(s)
        return shards

    @cached_property
    def _by_name(self) -> dict[str, list[Slice]]:
        out: dict[str, list[Slice]] = {p.name: [] for p in self.params}
        for s in self.slices:
            out[s.name].append(s)
        return out

    @cached_property
    def by_key(self) -> dict[str, Slice]:
        return {s.key: s for s in self.slices}

    @cached_property
    def specs(self) -> dict[str, ParamSpec]:
        return {p.name: p for p in self.params}

    def slices_for(self, shard: int) -> list[Slice]:
        return self._by_shard[shard]

    def slices_of(self, name: str) -> list[Slice]:
        return self._by_name[name]

    def shard_bytes(self) -> list[int]:
        return [sum(s.length * DTYPES[self.specs[s.name].dtype].itemsize for s in sl) for sl in self._by_shard]

    def split(self, tensors: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Flat views (no copy where the tensor is contiguous) of each slice, by slice key."""
        out: dict[str, torch.Tensor] = {}
        for name in names if names is not None else self.specs:
            flat = tensors[name].detach().reshape(-1)
            for s in self._by_name[name]:
                out[s.key] = flat[s.start : s.start + s.length]
        return out

    def assemble(self, slices: Mapping[str, torch.Tensor], names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Whole tensors, in their shapes, from slices by key (the inverse of `split`)."""
        out: dict[str, torch.Tensor] = {}
        for name in names if names is not None else self.specs:
            parts = [slices[s.key].reshape(-1) for s in self._by_name[name]]
            flat = parts[0] if len(parts) == 1 else torch.cat(parts)
            out[name] = flat.reshape(self.specs[name].shape)
        return out


def _split_param(p: ParamSpec, partition_bytes: int) -> list[tuple[str, int, int]]:
    count = max(1, math.ceil(p.nbytes / partition_bytes))
    per = math.ceil(p.numel / count) if p.numel else 0
    out = []
    for i in range(count):
        start = min(i * per, p.numel)
        out.append((f"{p.name}#{i}", start, min(per, p.numel - start)))
    return out


def make_plan(params: Sequence[ParamSpec], num_shards: int, partition_bytes: int) -> Plan:
    """Split tensors larger than `partition_bytes` into near-equal contiguous slices and place
    them on the least-loaded shard, largest first (deterministic: ties go to the lower id)."""
    if num_shards < 1:
        raise InvalidArgument(f"num_shards ({num_shards}) must be >= 1")
    check_partition_bytes(partition_bytes)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgument(f"parameter names must be unique; repeated: {dupes}")
    total = sum(max(1, math.ceil(p.nbytes / partition_bytes)) for p in params)
    if total > MAX_SLICES:
        raise InvalidArgument(f"the plan would have {total} slices; at most {MAX_SLICES} are allowed "
                              "(raise partition_bytes)")
    pieces = []
    for order, p in enumerate(params):
        item = DTYPES[p.dtype].itemsize
        for key, start, length in _split_param(p, partition_bytes):
            pieces.append((length * item, order, key, p.name, start, length))
    loads = [(0, k) for k in range(min(num_shards, len(pieces)) or 1)]  # (load, shard): a min-heap
    placed = {}
    for nbytes, _, key, name, start, length in sorted(pieces, key=lambda x: (-x[0], x[1], x[4])):
        load, shard = heapq.heappop(loads)
        heapq.heappush(loads, (load + nbytes, shard))
        placed[key] = Slice(key, name, start, length, shard)
    ordered = tuple(placed[key] for _, _, key, *_ in pieces)
    return Plan(tuple(params), num_shards, partition_bytes, ordered)


def specs_from_module(module: torch.nn.Module) -> list[ParamSpec]:
    """The plan's view of a model: its trainable parameters, in registration order."""
    return [
        ParamSpec(name, tuple(p.shape), dtype_name(p.dtype))
        for name, p in module.named_parameters()
        if p.requires_grad
    ]
