"""The server's SGD and momentum updates are torch.optim.SGD's, bit for bit."""

import pytest
import torch

from ps.config import OptimizerConfig
from ps.server.optim import SliceOptimizer, torch_optimizer


@pytest.mark.parametrize("name", ["sgd", "momentum"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sgd_and_momentum_match_torch_exactly(name, weight_decay):
    cfg = OptimizerConfig(name, lr=0.05, momentum=0.9, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(0)
    start = {k: torch.randn(n, generator=gen) for k, n in (("a#0", 1000), ("b#0", 7))}
    ours = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    theirs = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt, ref = SliceOptimizer(cfg, ours), torch_optimizer(cfg, list(theirs.values()))
    for step in range(6):
        scale = 1.0 / (1 + step % 3)  # staleness-aware learning rates
        grads = {k: torch.randn(v.shape, generator=gen) for k, v in start.items()}
        if step == 2:
            grads.pop("b#0")  # a push that does not touch every slice
        opt.step(grads, scale)
        for group in ref.param_groups:
            group["lr"] = cfg.lr * scale
        for k, p in theirs.items():
            p.grad = grads.get(k)
        ref.step()
        for k in start:
            assert torch.equal(ours[k].detach(), theirs[k].detach()), (step, k)
        if step == 3:  # through a checkpoint: the state comes back and goes on identically
            state = opt.state()
            assert set(state) == ({"a#0", "b#0"} if name == "momentum" else set())
            opt = SliceOptimizer(cfg, ours)
            opt.load_state(state)
