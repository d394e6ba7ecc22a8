"""A parameter that gets no gradient is not stepped (torch.optim skips a parameter whose grad is
None), on real server processes: not moved by weight decay or momentum, and in sync mode a
worker without a gradient for a key counts as a zero in the step's average (as an all-reduce)."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from ps.config import OptimizerConfig
from ps.data import batches, load_data, shard_indices
from ps.models import build_model, model_loss
from ps.sharding import specs_from_module
from ps.worker.client import PSClient
from tests.conftest import run_in_threads

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tests.rpc.no_grad_plugin:model"
STEPS, BATCH, SEED = 8, 16, 0


def _reference(workers: int) -> dict[str, torch.Tensor]:
    """Single-process training on each step's union of the workers' batches, built as ps-worker
    builds its model and batches."""
    torch.manual_seed(SEED)
    data = load_data("synthetic")
    model = build_model(MODEL, data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    streams = [batches(data.train, shard_indices(len(data.train), r, workers), BATCH, SEED * 1_000_003 + r)
               for r in range(workers)]
    for _ in range(STEPS):
        opt.zero_grad()
        parts = [next(s) for s in streams]
        loss = sum(model_loss(model, model(x), y) for x, y in parts) / workers
        loss.backward()
        opt.step()
    assert model.unused.grad is None
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_ps_worker_in_sync_mode_ends_on_single_process_weights_with_a_parameter_without_gradient(cluster):
    expected = _reference(2)
    with cluster(2, "sync", num_workers=2) as addresses:
        cmd = [sys.executable, "-m", "ps.cli.worker", "--servers", ",".join(addresses), "--num-workers", "2",
               "--model", MODEL, "--data", "synthetic", "--steps", str(STEPS), "--batch-size", str(BATCH),
               "--optimizer", "momentum", "--lr", "0.1", "--momentum", "0.9", "--weight-decay", "0.01",
               "--device", "cpu", "--eval-every", "0", "--no-progress", "--partition-bytes", "1024",
               "--seed", str(SEED)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        procs = [subprocess.Popen(cmd + ["--rank", str(r)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for r in range(2)]
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out
        torch.manual_seed(SEED)
        data = load_data("synthetic")
        with PSClient(addresses, partition_bytes=1024, heartbeat=False) as observer:
            observer.attach(specs_from_module(build_model(MODEL, data.input_shape, data.num_classes)))
            final = observer.pull(0, observer=True)
            stats = observer.stats()
    assert all(s["version"] == STEPS for s in stats)
    assert torch.equal(final["unused"], torch.ones(7)), "weight decay or momentum moved a parameter without gradient"
    for name, want in expected.items():
        torch.testing.assert_close(final[name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_a_key_one_sync_worker_has_no_gradient_for_averages_with_a_zero(cluster):
    init = {"a": torch.zeros(5), "b": torch.zeros(3)}
    sgd = OptimizerConfig("sgd", lr=1.0)

    def worker(rank: int) -> None:
        with PSClient(addresses, f"w{rank}") as c:
            c.setup(init, sgd)
            c.push({"a": torch.full((5,), 4.0), "b": torch.ones(3) if rank == 0 else None}, 0)
            c.pull(1)
            c.leave()

    with cluster(2, "sync", num_workers=2) as addresses:
        run_in_threads(worker, 2)
        with PSClient(addresses, heartbeat=False) as obs:
            obs.attach(specs_from_module(torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in init.items()})))
            final = obs.pull(0, observer=True)
    assert torch.equal(final["a"], torch.full((5,), -4.0))
    assert torch.equal(final["b"], torch.full((3,), -0.5))  # (1 + 0) / 2, not 1 / 1


def test_async_pushes_without_a_gradient_leave_the_parameter_where_it_is(cluster):
    init = {"a": torch.ones(4), "b": torch.ones(4)}
    opt = OptimizerConfig("momentum", lr=0.1, momentum=0.9, weight_decay=0.1)
    with cluster(2, "async") as addresses:
        with PSClient(addresses, "w0") as c:
            c.setup(init, opt)
            c.push({"a": torch.ones(4), "b": torch.ones(4)}, 0)  # b gets momentum here...
            moved = c.pull(1)["b"].clone()
            for step in (1, 2, 3):  # ...which must not carry it on while it has no gradient
                results = c.push({"a": torch.ones(4), "b": None}, step)
                assert {r["outcome"] for r in results} == {"APPLIED"}
            final = c.pull(4)
            stats = c.stats()
    assert torch.equal(final["b"], moved)
    assert not torch.equal(final["a"], moved)
    assert sum(s["version"] for s in stats) >= 4
