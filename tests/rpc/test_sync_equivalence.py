"""Sync mode is data-parallel SGD: 2 workers on half-batches == 1 process on the whole batch."""

import copy

import pytest
import torch

from ps.config import OptimizerConfig
from ps.sharding import specs_from_module
from ps.worker.client import PSClient
from tests.conftest import run_in_threads

STEPS = 20


def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 300), torch.nn.Tanh(), torch.nn.Linear(300, 4))
    x, y = torch.randn(STEPS, 64, 16), torch.randint(0, 4, (STEPS, 64))
    return model, x, y


def local_reference(model, x, y, opt_cfg):
    model = copy.deepcopy(model)
    if opt_cfg.name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
    else:
        momentum = opt_cfg.momentum if opt_cfg.name == "momentum" else 0.0
        opt = torch.optim.SGD(model.parameters(), lr=opt_cfg.lr, momentum=momentum, weight_decay=opt_cfg.weight_decay)
    for step in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[step]), y[step]).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def ps_worker(addresses, rank, model, x, y, opt_cfg, transport):
    model = copy.deepcopy(model)
    params = dict(model.named_parameters())
    with PSClient(addresses, f"w{rank}", partition_bytes=4096, transport=transport) as client:
        clock = client.setup(params, opt_cfg)
        assert client.paths() == [transport] * len(addresses)
        for step in range(clock, STEPS):
            weights = client.pull(step)
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(weights[n])
            model.zero_grad()
            half = slice(rank * 32, (rank + 1) * 32)
            torch.nn.functional.cross_entropy(model(x[step, half]), y[step, half]).backward()
            client.push({n: p.grad for n, p in params.items()}, step)
        client.leave()


@pytest.mark.parametrize("opt_cfg, transport", [  # each transport (see test_stream) meets the oracle
    (OptimizerConfig("sgd", lr=0.1, weight_decay=1e-3), "unary"),
    (OptimizerConfig("momentum", lr=0.05, momentum=0.9), "stream"),
    (OptimizerConfig("adam", lr=1e-3, weight_decay=1e-4), "shm"),
    (OptimizerConfig("momentum", lr=0.05, momentum=0.9, weight_decay=1e-3), "tcp"),
], ids=["sgd-unary", "momentum-stream", "adam-shm", "momentum-tcp"])
def test_two_workers_on_half_batches_match_one_process_on_the_whole_batch(cluster, transport_for, opt_cfg, transport):
    transport_for(transport)
    model, x, y = model_and_data()
    expected = local_reference(model, x, y, opt_cfg)
    with cluster(2, "sync", num_workers=2) as addresses:
        run_in_threads(lambda r: ps_worker(addresses, r, model, x, y, opt_cfg, transport), 2)
        with PSClient(addresses, partition_bytes=4096, heartbeat=False) as observer:
            observer.attach(specs_from_module(model))
            final = observer.pull(0, observer=True)
            stats = observer.stats()
    assert all(s["version"] == STEPS for s in stats)
    assert all((s["shm_bytes"] > 0) == (transport == "shm") for s in stats)
    assert sum(s["num_keys"] for s in stats) > 4, "the test must exercise split tensors"
    for name, want in expected.items():
        torch.testing.assert_close(final[name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
