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


@pytest.mark.parametrize("name", ["sgd", "momentum"])
def test_a_slice_a_reader_holds_is_updated_elsewhere_and_the_steps_still_match_torch(name):
    """Copy on write (ps.server.store): while a reader holds a slice's memory, an update writes
    into another buffer; the reader's view keeps its values, and the steps are torch's, bit for
    bit, whichever way each was made."""
    from ps.server.store import ParamStore

    cfg = OptimizerConfig(name, lr=0.05, momentum=0.9, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(1000, generator=gen)
    store = ParamStore()
    store.init({"a#0": start}, cfg)
    theirs = start.clone().requires_grad_(True)
    ref = torch_optimizer(cfg, [theirs])
    assert store.immutable
    for step in range(6):
        grad = torch.randn(1000, generator=gen)
        with store.reading(["a#0"], keep=True) as views:
            held = views if step % 2 else None  # every other step a reader keeps what it read
            before = bytes(views[0][1])
        store.apply({"a#0": grad})
        theirs.grad = grad
        ref.step()
        assert torch.equal(store.params["a#0"].detach(), theirs.detach())
        if held is not None:
            assert bytes(held[0][1]) == before  # what it read, unchanged
    adam = ParamStore()
    adam.init({"a#0": start}, OptimizerConfig("adam", lr=1e-3))
    assert not adam.immutable  # Adam steps in place: its readers copy
