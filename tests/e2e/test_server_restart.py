"""A server killed with SIGKILL mid-run and restarted with --restore: the workers retry, carry
on, and training reaches the target; a sync shard loses at most one checkpoint interval of
updates. A server stopped with SIGTERM writes a final checkpoint and resumes from it exactly."""

import io
import os
import signal
import time

import pytest
import torch

from ps.cli.launch import Observer, start_servers, start_worker, stop_all
from ps.config import OptimizerConfig
from ps.server.checkpoint import candidates
from ps.sharding import ParamSpec
from ps.worker.client import PSClient

INTERVAL = 20  # --checkpoint-every: updates


def _server(shard, num_shards, mode, ckpt, port=0, restore=False, out=None):
    extra = ["--shard-id", str(shard), "--num-shards", str(num_shards), "--port", str(port),
             "--checkpoint-dir", ckpt, "--checkpoint-every", str(INTERVAL), *(["--restore"] if restore else [])]
    return start_servers(1, mode, 2, worker_timeout=10.0, extra=extra, out=out or io.StringIO())[0]


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_server_killed_mid_run_restarts_from_its_checkpoint_and_training_completes(tmp_path, mode):
    ckpt = str(tmp_path / "ckpt")
    out = io.StringIO()
    servers = [_server(k, 2, mode, ckpt, out=out) for k in range(2)]
    workers = []
    try:
        addresses = ",".join(s.address for s in servers)
        workers = [start_worker(f"worker-{r}", [
            "--servers", addresses, "--rank", str(r), "--num-workers", "2", "--epochs", "30", "--no-progress"], out) for r in range(2)]
        # Kill shard 0 once it has written a checkpoint and trained on past it.
        _wait_for(lambda: len(candidates(ckpt, 0)) >= 1, 60, "a first checkpoint: " + out.getvalue()[-3000:])
        time.sleep(1.0)
        assert all(w.popen.poll() is None for w in workers), "training ended before the kill"
        servers[0].popen.send_signal(signal.SIGKILL)
        servers[0].popen.wait()
        time.sleep(1.0)  # the workers meet a dead server and retry
        port = int(servers[0].address.rpartition(":")[2])
        servers[0] = _server(0, 2, mode, ckpt, port=port, restore=True, out=out)
        for w in workers:
            assert w.popen.wait(timeout=240) == 0, out.getvalue()[-3000:]
        observer = Observer([s.address for s in servers], "mlp", "digits", 0, 4 << 20)
        try:
            accuracy, _ = observer.evaluate()
            stats = observer.client.stats()
        finally:
            observer.close()
        assert accuracy >= 0.93, out.getvalue()[-3000:]
        assert "restored version" in out.getvalue()
        if mode == "sync":  # the restored shard knows exactly how many steps it skipped
            lost = stats[0]["lost_updates"]
            assert 0 <= lost <= INTERVAL + 2, stats[0]
            print(f"sync: shard 0 lost {lost} updates (checkpoint every {INTERVAL})")
    finally:
        stop_all(workers + servers)


@pytest.mark.slow
def test_sigterm_writes_a_final_checkpoint_that_restores_the_same_weights(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    server = _server(0, 1, "async", ckpt)
    try:
        with PSClient([server.address], "w", heartbeat=False) as c:
            c.setup({"w": torch.zeros(10)}, OptimizerConfig("adam", lr=0.1))
            for step in range(3):
                c.push({"w": torch.linspace(-1, 1, 10)}, step)
            before = c.pull(3)["w"]
    finally:
        server.popen.send_signal(signal.SIGTERM)
        assert server.popen.wait(timeout=30) == 0
    assert os.path.basename(candidates(ckpt, 0)[0]) == "shard-0-v000000000003.json"
    server = _server(0, 1, "async", ckpt, restore=True)
    try:
        with PSClient([server.address], "w", heartbeat=False) as c:
            c.attach([ParamSpec("w", (10,))])
            assert torch.equal(c.pull(0, observer=True)["w"], before)
            assert c.stats()[0]["version"] == 3
    finally:
        stop_all([server])
