"""dlrm-tiny: a small DLRM (Naumov et al., 2019) whose embedding tables live on the servers.

    bottom MLP(dense) ─┐
    cat0 .. catK-1  ───┼─ pairwise dot products of the K + 1 vectors ─ top MLP ─ one logit
    (ServerEmbedding) ─┘   (+ the bottom output itself)

Inputs are rows [dense..., ids...] as ps.data.clicks makes them (float64: the ids, int64 values
below 2**53, survive it exactly). The dense layers are ordinary parameters (the servers' dense
optimizer trains them); each categorical feature has a server-held table `cat<f>` trained by
the servers' sparse optimizer (`table_optimizer`, `table_lr`). The output is one logit per
sample ([B]); `loss` is binary cross-entropy on it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ps.embedding import ServerEmbedding
from ps.errors import InvalidArgument


class DLRM(nn.Module):
    def __init__(self, input_shape=(8,), num_classes: int = 1, dense_features: int = 4, dim: int = 16,
                 hidden: int = 64, table_optimizer: str = "adagrad", table_lr: float = 0.05):
        super().__init__()
        if len(input_shape) != 1 or input_shape[0] <= dense_features:
            raise InvalidArgument(f"dlrm-tiny needs rows of {dense_features} dense features and at least one id: "
                                  f"input_shape ({tuple(input_shape)}) must be ({dense_features} + ids,), "
                                  "e.g. --data clicks")
        if num_classes != 1:
            raise InvalidArgument(f"dlrm-tiny predicts one click logit: num_classes ({num_classes}) must be 1 "
                                  "(binary 0/1 targets, e.g. --data clicks)")
        self.dense_features = dense_features
        categorical = input_shape[0] - dense_features
        self.bottom = nn.Sequential(nn.Linear(dense_features, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.ReLU())
        self.tables = nn.ModuleList(
            ServerEmbedding(f"cat{f}", dim, optimizer=table_optimizer, lr=table_lr) for f in range(categorical))
        vectors = categorical + 1
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("_pairs", rows * vectors + cols, persistent=False)
        self.top = nn.Sequential(nn.Linear(dim + len(rows), hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dense = x[:, :self.dense_features].float()
        ids = x[:, self.dense_features:].long()
        z = self.bottom(dense)
        vectors = torch.stack([z, *(t(ids[:, f]) for f, t in enumerate(self.tables))], 1)  # [B, K + 1, dim]
        dots = torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1)[:, self._pairs]
        return self.top(torch.cat([z, dots], 1)).squeeze(1)

    def table_ids(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ids each table reads for batch `x` (the trainer prefetches the next batch's rows)."""
        ids = x[:, self.dense_features:].long()
        return {t.spec.name: ids[:, f] for f, t in enumerate(self.tables)}

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(outputs, targets.to(outputs.dtype))


def dlrm_tiny(input_shape=(8,), num_classes: int = 1) -> DLRM:
    return DLRM(input_shape, num_classes)
