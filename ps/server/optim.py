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
    """One torch optimizer per slice, so that slices can be updated concurrently: torch's
    single-tensor update of a parameter depends on that parameter's state alone, so this is
    bit-identical to one optimizer over all slices.

    `step_one` of two different slices may run at once; the same slice is the caller's to
    serialise (the store holds that slice's lock).
    """

    def __init__(self, cfg: OptimizerConfig, params: Mapping[str, torch.Tensor]):
        self.cfg = cfg
        self.params = dict(params)
        self._opts = {key: torch_optimizer(cfg, [p]) for key, p in self.params.items()}
        # SGD and momentum can write a step's result into another buffer (`step_one(out=)`).
        self.out_of_place = cfg.name != "adam"

    def step(self, grads: Mapping[str, torch.Tensor], lr_scale: float = 1.0) -> None:
        """Apply fp32 gradients (by slice key) with lr * lr_scale, one slice after the other."""
        for key, grad in grads.items():
            self.step_one(key, grad, lr_scale)

    def step_one(self, key: str, grad: torch.Tensor, lr_scale: float = 1.0, out: torch.Tensor | None = None) -> None:
        """One step of slice `key`. `out` (SGD and momentum only): a buffer of the slice's shape
        that receives the new values, which the parameter then takes as its memory (the old
        buffer is left as it was: readers of it see the values before this step)."""
        lr = self.cfg.lr * lr_scale
        if self.cfg.name != "adam":
            self._sgd(key, grad, lr, out)
            return
        assert out is None, "Adam steps in place"
        opt, p = self._opts[key], self.params[key]
        opt.param_groups[0]["lr"] = lr
        p.grad = grad
        try:
            opt.step()
        finally:
            p.grad = None

    def _sgd(self, key: str, grad: torch.Tensor, lr: float, out: torch.Tensor | None = None) -> None:
        """torch.optim.SGD's single-tensor update as configured here (no dampening, no nesterov):
        the same operations in the same order, so bit-identical results, without the per-call
        machinery of `Optimizer.step` (profiler hooks), which costs more than the update of a
        small slice. Momentum buffers live in the torch optimizer's state, where torch keeps
        them (checkpoints read them there)."""
        wd = self.cfg.weight_decay
        momentum = self.cfg.momentum if self.cfg.name == "momentum" else 0.0
        p = self.params[key]
        with torch.no_grad():
            if wd != 0:
                grad = grad.add(p, alpha=wd)
            if momentum != 0:
                state = self._opts[key].state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad, alpha=1)
                grad = buf
            if out is None:
                p.add_(grad, alpha=-lr)
            else:  # the same kernel and arithmetic as add_ (bit-identical), into `out`
                torch.add(p, grad, alpha=-lr, out=out)
                p.set_(out)

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of the optimizer's per-slice state (momentum buffers, Adam moments and steps)."""
        out = {}
        for key, p in self.params.items():
            st = {n: v.detach().clone() for n, v in self._opts[key].state.get(p, {}).items()
                  if isinstance(v, torch.Tensor)}
            if st:
                out[key] = st
        return out

    def load_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore what `state` returned (slices missing from it start fresh, as torch's would)."""
        for key, st in state.items():
            if key not in self.params:
                raise KeyError(f"optimizer state for unknown slice {key!r}")
            self._opts[key].state[self.params[key]] = {n: t.clone() for n, t in st.items()}


def warm_up() -> None:
    """Build and step each optimizer once: torch imports parts of itself lazily on first use
    (seconds), which must not happen while workers wait."""
    for name in ("sgd", "momentum", "adam"):
        p = torch.zeros(2, requires_grad=True)
        SliceOptimizer(OptimizerConfig(name, lr=0.1), {"p": p}).step({"p": torch.ones(2)})
