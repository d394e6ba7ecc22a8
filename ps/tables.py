"""Embedding tables held by the servers: what workers and servers agree on.

A table's rows live only on the servers. Ids are int64 and unbounded (no hashing into a fixed
range): a row is created the first time a gradient reaches it (after `admit_after` pushes carrying
its id, see ps.server.table) with a deterministic init computed from (table seed, id, column), so
any process can tell what an untouched row reads as. Rows are placed on shards by a 64-bit mix of
the id, not by the 4 MiB slicing of dense tensors.

This module holds the parts both sides compute the same way: the table spec and its checks, the
id mix (`mix64`), placement (`shard_of`) and the row init (`init_rows`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ps.errors import InvalidArgument

TABLE_OPTIMIZERS = ("sgd", "adagrad", "rowwise_adagrad", "lazy_adam")
INITS = ("normal", "uniform", "zeros")
MAX_DIM = 1 << 16
DEFAULT_EPS = {"sgd": 0.0, "adagrad": 1e-10, "rowwise_adagrad": 1e-8, "lazy_adam": 1e-8}  # torch's defaults

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
PLACE_SALT = np.uint64(0x5D1E_0F5E_7A11_C0DE)  # shard placement
INIT_SALT = np.uint64(0x1A17_0B5E_ED00_0001)   # row init


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over a uint64 array (wrapping arithmetic): a bijection that spreads
    nearby ids over all 64 bits."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64, copy=True)
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def as_ids(ids, what: str = "ids") -> np.ndarray:
    """A 1-D int64 numpy view of `ids` (a torch tensor or numpy array of dtype int64)."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype != torch.int64:
            raise InvalidArgument(f"{what} must be int64 (torch.long), not {str(ids.dtype).removeprefix('torch.')}")
        return ids.detach().cpu().reshape(-1).numpy()
    arr = np.asarray(ids)
    if arr.dtype != np.int64:
        raise InvalidArgument(f"{what} must be int64, not {arr.dtype}")
    return arr.reshape(-1)


def shard_of(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard each id's row lives on (int64 array): mix64(id ^ salt) mod num_shards."""
    if num_shards == 1:
        return np.zeros(len(ids), np.int64)
    return (mix64(ids.view(np.uint64) ^ PLACE_SALT) % np.uint64(num_shards)).astype(np.int64)


@dataclass(frozen=True)
class TableSpec:
    """One server-held table. Every worker declares the same spec (a worker whose spec differs is
    refused, as a worker with another dense plan is).

    optimizer: sgd | adagrad | rowwise_adagrad | lazy_adam, applied to the rows a step touches
        only (torch's SGD, Adagrad and SparseAdam on sparse gradients; row-wise adagrad as in
        FBGEMM: one accumulator per row, the mean of the squared gradient).
    init: normal (std `init_scale`) | uniform (in [-init_scale, init_scale)) | zeros; init_scale
        defaults to 1/sqrt(dim). Each row's init depends only on (seed, id).
    admit_after: a row is created by the push that carries its id for the admit_after-th time;
        before, it reads as its init and its gradients are dropped (counted). 1: created at once.
    evict_after: a row untouched by this many of its shard's table updates is evicted (0: never).
    max_rows: rows one shard keeps at most; beyond, the least recently updated go (0: no cap).
    signed_ids: ids may be negative (by default they must be >= 0, as TorchRec's are).
    """

    name: str
    dim: int
    optimizer: str = "sgd"
    lr: float = 0.01
    eps: float = -1.0  # < 0: the optimizer's default (DEFAULT_EPS)
    beta1: float = 0.9
    beta2: float = 0.999
    initial_accumulator: float = 0.0
    init: str = "normal"
    init_scale: float = 0.0  # 0: 1/sqrt(dim)
    seed: int = 0
    admit_after: int = 1
    evict_after: int = 0
    max_rows: int = 0
    signed_ids: bool = False

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidArgument(f"table {self.name!r}: {message}")

        check(bool(self.name) and len(self.name) <= 256 and "/" not in self.name and self.name.isprintable(),
              "a table name must be 1-256 printable characters without '/'")
        check(1 <= self.dim <= MAX_DIM, f"dim ({self.dim}) must be in [1, {MAX_DIM}]")
        check(self.optimizer in TABLE_OPTIMIZERS, f"optimizer ({self.optimizer!r}) must be one of {TABLE_OPTIMIZERS}")
        check(math.isfinite(self.lr) and self.lr > 0, f"lr ({self.lr}) must be a finite number > 0")
        check(math.isfinite(self.eps) and (self.eps < 0 or self.eps > 0 or self.optimizer == "sgd"),
              f"eps ({self.eps}) must be > 0 (or < 0 for the optimizer's default)")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas ({self.beta1}, {self.beta2}) must be in [0, 1)")
        check(math.isfinite(self.initial_accumulator) and self.initial_accumulator >= 0,
              f"initial_accumulator ({self.initial_accumulator}) must be >= 0")
        check(self.init in INITS, f"init ({self.init!r}) must be one of {INITS}")
        check(math.isfinite(self.init_scale) and self.init_scale >= 0, f"init_scale ({self.init_scale}) must be >= 0")
        check(0 <= self.seed < (1 << 63), f"seed ({self.seed}) must be in [0, 2**63)")
        check(1 <= self.admit_after <= (1 << 31), f"admit_after ({self.admit_after}) must be >= 1")
        check(0 <= self.evict_after < (1 << 62), f"evict_after ({self.evict_after}) must be >= 0 (0: never)")
        check(0 <= self.max_rows < (1 << 40), f"max_rows ({self.max_rows}) must be >= 0 (0: no cap)")

    @property
    def epsilon(self) -> float:
        return self.eps if self.eps >= 0 else DEFAULT_EPS[self.optimizer]

    @property
    def scale(self) -> float:
        return self.init_scale or 1.0 / math.sqrt(self.dim)

    def fingerprint(self) -> str:
        return hashlib.sha256(repr(sorted(asdict(self).items())).encode()).hexdigest()[:16]

    def check_grads(self, num_ids: int, grads: torch.Tensor) -> None:
        """InvalidArgument unless `grads` is one finite row of dim floats per id."""
        if tuple(grads.shape) != (num_ids, self.dim):
            raise InvalidArgument(f"table {self.name!r}: gradients have shape {tuple(grads.shape)}, expected "
                                  f"({num_ids}, {self.dim}) for {num_ids} ids")
        if num_ids and not bool(torch.isfinite(grads).all()):
            raise InvalidArgument(f"table {self.name!r}: gradients hold NaN or infinity")

    def check_ids(self, ids: np.ndarray, what: str = "ids") -> None:
        """InvalidArgument for negative ids when the table takes none."""
        if not self.signed_ids and len(ids) and int(ids.min()) < 0:
            raise InvalidArgument(f"table {self.name!r}: {what} must be >= 0 (found {int(ids.min())}); "
                                  "declare the table with signed_ids=True to allow negative ids")


def coalesce(ids: np.ndarray, grads: torch.Tensor, counts: np.ndarray | None = None
             ) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """Sorted distinct ids, their summed gradients, and their summed `counts` (default: one per
    row given: how many rows each id had). Ids already sorted and distinct (np.unique's output)
    come back as they are."""
    counts = np.ones(len(ids), np.int64) if counts is None else counts
    if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
        return ids, grads, counts
    uniq, inverse = np.unique(ids, return_inverse=True)
    inverse = inverse.reshape(-1)
    out = torch.zeros(len(uniq), grads.shape[1], dtype=grads.dtype)
    out.index_add_(0, torch.from_numpy(inverse), grads)
    return uniq, out, np.bincount(inverse, weights=counts, minlength=len(uniq)).astype(np.int64)


def _uniform(ids: np.ndarray, dim: int, seed: int, stream: int) -> np.ndarray:
    """Uniforms in [0, 1) (float64, shape [n, dim]), one per (seed, id, column, stream)."""
    base = mix64(ids.view(np.uint64) ^ mix64(np.array([seed], np.uint64) ^ INIT_SALT))
    cols = (np.arange(dim, dtype=np.uint64) * np.uint64(2) + np.uint64(stream) + np.uint64(1)) * _GOLDEN
    with np.errstate(over="ignore"):
        bits = mix64(base[:, None] + cols[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def init_rows(spec: TableSpec, ids: np.ndarray) -> torch.Tensor:
    """The init of each id's row (float32, [len(ids), dim]): a function of (spec.seed, id) only."""
    n = len(ids)
    if spec.init == "zeros" or n == 0:
        return torch.zeros(n, spec.dim, dtype=torch.float32)
    if spec.init == "uniform":
        u = _uniform(ids, spec.dim, spec.seed, 0)
        return torch.from_numpy(((2.0 * u - 1.0) * spec.scale).astype(np.float32))
    u1 = _uniform(ids, spec.dim, spec.seed, 0)
    u2 = _uniform(ids, spec.dim, spec.seed, 1)
    normal = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)  # Box-Muller (1 - u1 > 0)
    return torch.from_numpy((normal * spec.scale).astype(np.float32))


def init_table(spec: TableSpec, num_rows: int) -> torch.Tensor:
    """Rows 0..num_rows-1 as the servers would create them: a local torch.nn.Embedding's weight
    that starts where a server-held table does (for tests and single-process baselines)."""
    return init_rows(spec, np.arange(num_rows, dtype=np.int64))
