"""Megatron-style tensor-parallel layers. Each declares which dimension of each parameter is split
across the group (`PARTITION`); parameters it does not name are replicated. Communication happens
only through the primitives of `ps.tp.comm`.

With a group of one, every layer is an ordinary layer, which is how the unsharded reference model
is built: `shard_state` cuts its state into the slices of any rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ps.errors import InvalidArgument
from ps.tp.comm import copy_to, gather_from, reduce_from, scatter_to
from ps.tp.groups import TPGroup


def _divide(n: int, k: int, what: str) -> int:
    if n % k:
        raise InvalidArgument(f"{what} ({n}) must be divisible by the tensor-parallel size ({k})")
    return n // k


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows: each rank computes its slice of y."""

    PARTITION = {"weight": 0, "bias": 0}

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = True,
                 gather_output: bool = False):
        super().__init__()
        self.tp, self.gather_output = tp, gather_output
        local = _divide(out_features, tp.size, "out_features")
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.zeros(local)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to(x, self.tp), self.weight, self.bias)
        return gather_from(y, self.tp) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns: partial products are summed over the group;
    the bias is replicated and added once, after the sum."""

    PARTITION = {"weight": 1}

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = True,
                 input_is_parallel: bool = True):
        super().__init__()
        self.tp, self.input_is_parallel = tp, input_is_parallel
        self.weight = nn.Parameter(torch.empty(out_features, _divide(in_features, tp.size, "in_features")))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to(x, self.tp)
        y = reduce_from(F.linear(x, self.weight), self.tp)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split by vocabulary range; each rank looks up its own ids, zeros the rest,
    and the partial embeddings are summed over the group."""

    PARTITION = {"weight": 0}

    def __init__(self, vocab: int, dim: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.per_rank = _divide(vocab, tp.size, "vocab")
        self.start = tp.rank * self.per_rank
        self.weight = nn.Parameter(torch.randn(self.per_rank, dim) * 0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.start + self.per_rank)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from(out, self.tp)


def _dropout(x: torch.Tensor, p: float, training: bool, gen: torch.Generator | None) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
    return x * keep / (1.0 - p)


class ParallelMLP(nn.Module):
    """Column-parallel then row-parallel linear, no communication between them."""

    def __init__(self, dim: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.fc1 = ColumnParallelLinear(dim, hidden, tp)
        self.fc2 = RowParallelLinear(hidden, dim, tp, input_is_parallel=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ParallelSelfAttention(nn.Module):
    """Causal self-attention with the heads split across ranks. The fused qkv projection's output
    is laid out (head, q|k|v, head_dim), so each rank's contiguous rows are whole heads."""

    def __init__(self, dim: int, heads: int, tp: TPGroup, attn_dropout: float = 0.0):
        super().__init__()
        self.tp, self.attn_dropout = tp, attn_dropout
        self.local_heads = _divide(heads, tp.size, "heads")
        self.head_dim = _divide(dim, heads, "dim / heads")
        self.qkv = ColumnParallelLinear(dim, 3 * dim, tp)
        self.out = RowParallelLinear(dim, dim, tp, input_is_parallel=True)

    def forward(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.local_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = att.masked_fill(causal, float("-inf")).softmax(-1)
        att = _dropout(att, self.attn_dropout, self.training, gen)  # per-rank stream: heads differ
        y = (att @ v).transpose(1, 2).reshape(b, t, self.local_heads * self.head_dim)
        return self.out(y)


def partition_dims(model: nn.Module) -> dict[str, int]:
    """{parameter name: split dimension} for every tensor-parallel parameter of `model`."""
    dims: dict[str, int] = {}
    for prefix, module in model.named_modules():
        for name, dim in getattr(module, "PARTITION", {}).items():
            if getattr(module, name, None) is not None:
                dims[f"{prefix}.{name}" if prefix else name] = dim
    return dims


def shard_state(full: dict[str, torch.Tensor], dims: dict[str, int], rank: int, size: int) -> dict[str, torch.Tensor]:
    """This rank's slice of every split parameter of an unsharded state; replicated ones as is."""
    return {n: torch.chunk(t, size, dim=dims[n])[rank].clone() if n in dims else t.clone() for n, t in full.items()}
