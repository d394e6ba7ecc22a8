"""Server-side optimizers with exactly torch.optim's semantics, applied to fp32 master slices."""

from __future__ import annotations

from typing import Mapping

import torch

from ps.config import OptimizerConfig


class SliceOptimizer:
    """One torch optimizer over a shard's slices; `step` updates only the slices given grads.

    Not thread-safe: the shard calls it under its lock.
    """

    def __init__(self, cfg: OptimizerConfig, params: Mapping[str, torch.Tensor]):
        self.cfg = cfg
        self.params = dict(params)
        tensors = list(self.params.values())
        if cfg.name == "adam":
            self._opt: torch.optim.Optimizer = torch.optim.Adam(
                tensors, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                weight_decay=cfg.weight_decay, foreach=False,
            )
        else:
            momentum = cfg.momentum if cfg.name == "momentum" else 0.0
            self._opt = torch.optim.SGD(
                tensors, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay, foreach=False
            )

    def step(self, grads: Mapping[str, torch.Tensor], lr_scale: float = 1.0) -> None:
        """Apply fp32 gradients (by slice key) with lr * lr_scale."""
        for group in self._opt.param_groups:
            group["lr"] = self.cfg.lr * lr_scale
        for key, grad in grads.items():
            self.params[key].grad = grad
        try:
            self._opt.step()
        finally:
            for key in grads:
                self.params[key].grad = None
