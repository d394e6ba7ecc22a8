"""The README's own model with server-held tables, and a click log for it: users and items with
a hidden affinity, ids far apart in int64 (no vocabulary bound)."""

import numpy as np
import torch

from ps.data import Datasets
from ps.embedding import ServerEmbedding, ServerEmbeddingBag


class Model(torch.nn.Module):  # as in README.md, "Embedding tables larger than any worker"
    def __init__(self):
        super().__init__()
        self.users = ServerEmbedding("users", 16, optimizer="adagrad", lr=0.05)        # ids: int64, unbounded
        self.items = ServerEmbeddingBag("items", 16, mode="mean", optimizer="lazy_adam", lr=1e-3,
                                        admit_after=2, evict_after=10_000, max_rows=5_000_000)
        self.head = torch.nn.Linear(32, 1)                                              # dense: as before

    def forward(self, x):                      # x: [B, 1 + 3] int64 (a user id, a bag of 3 item ids)
        return self.head(torch.cat([self.users(x[:, 0]), self.items(x[:, 1:])], 1)).squeeze(1)

    def loss(self, logits, clicked):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, clicked)


def data(samples: int = 12000):
    rng = np.random.default_rng(7)
    users = rng.integers(0, 400, samples) * 1_000_003 + (1 << 40)  # sparse, large ids
    items = rng.integers(0, 300, (samples, 3)) * 7919
    bias_u = rng.standard_normal(400) * 1.5
    bias_i = rng.standard_normal(300) * 1.5
    logit = bias_u[(users - (1 << 40)) // 1_000_003] + bias_i[items // 7919].mean(1) * 2
    clicked = (rng.random(samples) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    x = torch.from_numpy(np.concatenate([users[:, None], items], 1).astype(np.int64))
    y = torch.from_numpy(clicked)
    cut = samples * 5 // 6
    return Datasets((x[:cut], y[:cut]), (x[cut:], y[cut:]), (4,), 1)
