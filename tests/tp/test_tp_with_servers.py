"""Hybrid data x tensor parallelism against real servers: 2 groups of TP=2 (with micro-batches,
activation recomputation and gradients pushed during backward, where a rank's keys may all live
on one shard) in sync mode end on the same weights as 2 plain workers (TP=1) on the same data."""

import os
import subprocess
import sys

import pytest
import torch

from ps.cli.launch import Observer
from ps.data import load_data
from ps.models import build_model
from tests.conftest import running_cluster

STEPS = 10


def train_cluster(tp, extra=(), mode="sync", groups=2):
    # a TP group is one worker at the servers (one clock, one push per step): they expect `groups`
    with running_cluster(2, mode, num_workers=groups) as addresses:
        # group 0 of a TP job is started by torchrun (its ranks join the group torchrun describes);
        # the other spawns its own ranks
        launcher = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(tp), "-m"]
                    if tp > 1 and r == 0 else [sys.executable, "-m"] for r in range(groups)]
        procs = [subprocess.Popen(
            [*launcher[r], "ps.cli.worker", "--servers", ",".join(addresses), "--rank", str(r),
             "--num-workers", str(groups), "--tp", str(tp), "--model", "gpt-tiny", "--data", "sequences",
             "--steps", str(STEPS), "--eval-every", "0", "--no-progress", "--partition-bytes", "16384", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            for r in range(groups)]
        for p in procs:
            out, _ = p.communicate(timeout=300)
            assert p.returncode == 0, out
        observer = Observer(addresses, "gpt-tiny", "sequences", 0, 16384, tp=tp)
        try:
            stats = observer.client.stats()
            return observer.weights(), stats
        finally:
            observer.close()


@pytest.mark.slow
def test_two_tp2_groups_match_two_plain_workers_after_ten_sync_steps():
    tp2, stats = train_cluster(2, ["--micro-batches", "2", "--recompute", "--push-early"])
    assert all(s["version"] == STEPS for s in stats)
    assert sum(len(s["clocks"]) for s in stats) == 0  # every rank left at the end
    plain, _ = train_cluster(1)
    assert tp2.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(tp2[name], plain[name], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
    initial = initial_weights()
    assert all(not torch.equal(plain[n], initial[n]) for n in plain), "every parameter must have been trained"


@pytest.mark.slow
def test_a_tp_group_in_async_is_one_worker_with_one_push_per_step():
    """One ps-worker --tp 2 alone in async mode: every step is one push and one version at each
    shard, and no push is stale (each rank a worker of its own: one rank's gradient would land
    after the other's update, and a step would count twice)."""
    _, stats = train_cluster(2, mode="async", groups=1)
    for s in stats:
        assert s["version"] == STEPS and s["pushes"] == STEPS, s
        assert s["staleness_histogram"] == {0: STEPS}, s
        assert s["clocks"] == {} and s["evictions"] == 0, s


def initial_weights():
    torch.manual_seed(0)
    d = load_data("sequences")
    return {n: p.detach() for n, p in build_model("gpt-tiny", d.input_shape, d.num_classes).named_parameters()}


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL tensor parallelism needs one GPU per rank")
def test_two_tp2_groups_on_cuda_match_two_plain_workers():
    tp2, _ = train_cluster(2, ["--device", "cuda"])
    plain, _ = train_cluster(1, ["--device", "cuda"])
    for name in plain:
        torch.testing.assert_close(tp2[name], plain[name], rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
