"""Server-side optimizers with exactly torch.optim's semantics, applied to fp32 master slices."""

from __future__ import annotations

from typing import Mapping

import torch

from ps.config import OptimizerConfig


def torch_optimizer(cfg: OptimizerConfig, params) -> torch.optim.Optimizer:
    """The torch optimizer an `OptimizerConfig` names (also used by single-process baselines)."""
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                weight_decay=cfg.weight_decay, foreach=False)
    momentum = cfg.momentum if cfg.name == "momentum" else 0.0
    return torch.optim.SGD(params, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay, foreach=False)


class SliceOptimizer:
    """One torch optimizer over a shard's slices; `step` updates only the slices given grads.

    Not thread-safe: the shard calls it under its lock.
    """

    def __init__(self, cfg: OptimizerConfig, params: Mapping[str, torch.Tensor]):
        self.cfg = cfg
        self.params = dict(params)
        tensors = list(self.params.values())
        self._opt: torch.optim.Optimizer | None = None
        if not tensors:  # a shard the plan gave no slices: nothing to update
            return
        self._opt = torch_optimizer(cfg, tensors)

    def step(self, grads: Mapping[str, torch.Tensor], lr_scale: float = 1.0) -> None:
        """Apply fp32 gradients (by slice key) with lr * lr_scale."""
        if self._opt is None:
            return
        if self.cfg.name != "adam":
            self._sgd(grads, self.cfg.lr * lr_scale)
            return
        for group in self._opt.param_groups:
            group["lr"] = self.cfg.lr * lr_scale
        for key, grad in grads.items():
            self.params[key].grad = grad
        try:
            self._opt.step()
        finally:
            for key in grads:
                self.params[key].grad = None


    def _sgd(self, grads: Mapping[str, torch.Tensor], lr: float) -> None:
        """torch.optim.SGD's single-tensor update as configured here (no dampening, no nesterov):
        the same operations in the same order, so bit-identical results, without the per-call
        machinery of `Optimizer.step` (profiler hooks, a walk over every parameter), which costs
        more than the update of a small slice. Momentum buffers live in the torch optimizer's
        state, where torch keeps them (checkpoints read them there)."""
        assert self._opt is not None
        wd = self.cfg.weight_decay
        momentum = self.cfg.momentum if self.cfg.name == "momentum" else 0.0
        with torch.no_grad():
            for key, grad in grads.items():
                p = self.params[key]
                if wd != 0:
                    grad = grad.add(p, alpha=wd)
                if momentum != 0:
                    state = self._opt.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1)
                    grad = buf
                p.add_(grad, alpha=-lr)

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of the optimizer's per-slice state (momentum buffers, Adam moments and steps)."""
        if self._opt is None:
            return {}
        out = {}
        for key, p in self.params.items():
            st = {n: v.detach().clone() for n, v in self._opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}
            if st:
                out[key] = st
        return out

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore what `state` returned (slices missing from it start fresh, as torch's would)."""
        for key, st in state.items():
            if key not in self.params or self._opt is None:
                raise KeyError(f"optimizer state for unknown slice {key!r}")
            self._opt.state[self.params[key]] = {n: t.clone() for n, t in st.items()}


def warm_up() -> None:
    """Build and step each optimizer once: torch imports parts of itself lazily on first use
    (seconds), which must not happen under a shard's lock while workers wait."""
    for name in ("sgd", "momentum", "adam"):
        p = torch.zeros(2, requires_grad=True)
        SliceOptimizer(OptimizerConfig(name, lr=0.1), {"p": p}).step({"p": torch.ones(2)})
