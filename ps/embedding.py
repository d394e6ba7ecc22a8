"""Embedding layers whose rows live on the servers, usable inside a model like torch.nn.Embedding.

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.users = ServerEmbedding("users", 16, optimizer="adagrad", lr=0.05)
            self.items = ServerEmbeddingBag("items", 16, mode="mean")
            self.head = nn.Linear(32, 1)

        def forward(self, x):
            return self.head(torch.cat([self.users(x.user_ids), self.items(x.item_ids, x.offsets)], 1))

A server-held table holds no torch parameter: `model.parameters()` are the dense ones, which
the servers hold as before. `ps-worker` (ps.worker.trainer) finds these layers, declares their
tables to the servers and runs each step as:

    group.begin(clock)     # this step's forwards read rows at `clock`
    loss.backward()        # forward pulled only the distinct ids of the batch
    group.push(clock)      # the rows' gradients, one request per shard

In a loop of your own, use `TableGroup(model, client)` the same way. Outside a step (no clock,
or in eval mode) a forward reads rows as an observer: it never waits and sends no gradient.

Ids are int64 and unbounded (no num_embeddings): a row is created on the servers by its first
gradient, from a deterministic init (ps.tables.init_rows). The ids of a forward are deduplicated
before they travel; `prefetch(ids, clock)` starts reading rows in the background, and a later
forward at that clock over ids that are all among them takes them from there.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ps.errors import InvalidArgument
from ps.tables import TableSpec, as_ids, coalesce

log = logging.getLogger("ps.worker")


class ServerEmbedding(nn.Module):
    """torch.nn.Embedding(ids) -> [*ids.shape, dim], its rows on the servers. The keyword
    arguments are TableSpec's (optimizer, lr, init, admit_after, evict_after, max_rows, ...)."""

    def __init__(self, name: str, dim: int, **spec):
        super().__init__()
        self.spec = TableSpec(name, dim, **spec)
        self._client = None
        self._clock: int | None = None
        self._touched: list[tuple[np.ndarray, torch.Tensor]] = []
        self._ahead: tuple[int, np.ndarray, concurrent.futures.Future] | None = None

    def extra_repr(self) -> str:
        return f"{self.spec.name!r}, {self.spec.dim}, optimizer={self.spec.optimizer!r}"

    # -- binding (TableGroup) -----------------------------------------------------------------
    def bind(self, client) -> None:
        self._client = client

    def begin(self, clock: int | None) -> None:
        self._clock = clock
        self._touched = []

    def _rows(self, uniq: np.ndarray) -> torch.Tensor:
        if self._client is None:
            raise InvalidArgument(f"server-held table {self.spec.name!r} is not bound to a client: train it with "
                                  "ps-worker, or call ps.embedding.TableGroup(model, client).setup()")
        observer = self._clock is None or not self.training
        if not observer and self._ahead is not None and self._ahead[0] == self._clock:
            _, ids, future = self._ahead
            pos = np.searchsorted(ids, uniq)
            pos = np.minimum(pos, len(ids) - 1) if len(ids) else pos
            if len(ids) and (ids[pos] == uniq).all():
                try:
                    return future.result()[self.spec.name][torch.from_numpy(pos)]
                except Exception as e:  # noqa: BLE001 - the prefetch failed (e.g. cancelled): read them now
                    log.info("table %r: prefetched rows unavailable (%s); reading them again", self.spec.name, e)
                    self._ahead = None
        if self._ahead is not None and not observer and self._ahead[0] < self._clock:  # for a step gone by
            self._ahead[2].cancel()
            self._ahead = None
        return self._client.pull_rows(None if observer else self._clock, {self.spec.name: uniq})[self.spec.name]

    def prefetch(self, ids: torch.Tensor, clock: int) -> None:
        """Start reading the rows of `ids` at `clock` in the background (the next step's batch)."""
        uniq = np.unique(as_ids(ids, f"ids of table {self.spec.name!r}"))  # (the client checks them)
        if self._ahead is not None:
            self._ahead[2].cancel()
        self._ahead = (clock, uniq, self._client.pull_rows_async(clock, {self.spec.name: uniq}))

    def _lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distinct rows on ids' device, index of each id among them)."""
        uniq, inverse = np.unique(as_ids(ids, f"ids of table {self.spec.name!r}"), return_inverse=True)
        rows = self._rows(uniq).to(ids.device)
        if self.training and self._clock is not None and torch.is_grad_enabled():
            rows.requires_grad_(True)
            self._touched.append((uniq, rows))
        return rows, torch.from_numpy(inverse.reshape(-1)).to(ids.device).view(ids.shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows, index = self._lookup(ids)
        return F.embedding(index, rows)

    def gradients(self) -> tuple[np.ndarray, torch.Tensor] | None:
        """This step's (distinct ids, their fp32 CPU gradients), summed over its forwards; None
        when no forward of this step reached the loss."""
        parts = [(ids, rows.grad) for ids, rows in self._touched if rows.grad is not None]
        self._touched = []
        if not parts:
            return None
        ids, grads, _ = coalesce(np.concatenate([i for i, _ in parts]),
                                 torch.cat([g.detach().to("cpu", torch.float32) for _, g in parts]))
        return ids, grads


class ServerEmbeddingBag(ServerEmbedding):
    """torch.nn.EmbeddingBag (mode sum or mean) over server-held rows: 2-D ids are one bag per
    row; 1-D ids take `offsets`; `per_sample_weights` with mode sum, as in torch."""

    def __init__(self, name: str, dim: int, mode: str = "mean", **spec):
        if mode not in ("sum", "mean"):
            raise InvalidArgument(f"table {name!r}: mode ({mode!r}) must be sum or mean")
        super().__init__(name, dim, **spec)
        self.mode = mode

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        rows, index = self._lookup(ids)
        return F.embedding_bag(index, rows, offsets, mode=self.mode, per_sample_weights=per_sample_weights)


def server_tables(model: nn.Module) -> dict[str, ServerEmbedding]:
    """The model's server-held tables by name; InvalidArgument when two layers share a name."""
    out: dict[str, ServerEmbedding] = {}
    for module in model.modules():
        if isinstance(module, ServerEmbedding):
            other = out.get(module.spec.name)
            if other is not None and other is not module:
                raise InvalidArgument(f"two layers declare table {module.spec.name!r}: give each its own name "
                                      "(or use one layer twice)")
            out[module.spec.name] = module
    return out


class TableGroup:
    """A model's server-held tables, driven step by step against one client (PSClient)."""

    def __init__(self, model: nn.Module, client):
        self.client = client
        self.tables = server_tables(model)

    def __bool__(self) -> bool:
        return bool(self.tables)

    def setup(self) -> str:
        """Declare the tables on every shard and bind the layers; returns the tables' mode."""
        if not self.tables:
            return ""
        mode = self.client.init_tables([t.spec for t in self.tables.values()])
        for t in self.tables.values():
            t.bind(self.client)
        return mode

    def begin(self, clock: int | None) -> None:
        """This step's forwards read rows at `clock` (None: as an observer)."""
        for t in self.tables.values():
            t.begin(clock)

    def prefetch(self, ids: Mapping[str, torch.Tensor], clock: int) -> None:
        for name, t_ids in ids.items():
            if name not in self.tables:
                raise InvalidArgument(f"prefetch names table {name!r}; the model has {sorted(self.tables)}")
            self.tables[name].prefetch(t_ids, clock)

    def push(self, clock: int) -> list[dict]:
        """Send this step's row gradients (every shard gets one push, with or without rows)."""
        if not self.tables:
            return []
        grads = {name: g for name, t in self.tables.items() if (g := t.gradients()) is not None}
        return self.client.push_rows(clock, grads)
