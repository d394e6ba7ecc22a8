"""The worker's training loop against an in-process server on port 0 (CPU, and CUDA when present)."""

import json

import pytest
import torch

from ps.config import OptimizerConfig, ServerConfig, WorkerConfig
from ps.data import load_data
from ps.models import build_model
from ps.server.app import create_server
from ps.worker.client import PSClient
from ps.errors import InvalidArgument
from ps.tp.groups import GROUP_TIMEOUT, group_timeout
from ps.worker.trainer import HostGrads, local_index, resolve_device, train


def train_once(device, tmp_path, model="mlp", steps=30, **overrides):
    server = create_server(ServerConfig(mode="sync"))
    try:
        cfg = WorkerConfig(servers=(server.address,), worker_id="w0", steps=steps, device=device, eval_every=10,
                           model=model, log_dir=str(tmp_path), **overrides)
        torch.manual_seed(cfg.seed)
        data = load_data(cfg.data)
        net = build_model(cfg.model, data.input_shape, data.num_classes)
        with PSClient(cfg.servers, cfg.worker_id) as client:
            result = train(cfg, client, net, data)
            stats = client.stats()[0]
        return {n: p.detach().cpu() for n, p in net.named_parameters()}, result, stats
    finally:
        server.stop()


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_training_logs_jsonl_and_ends_with_the_servers_weights(tmp_path, model):
    weights, result, stats = train_once("cpu", tmp_path, model)
    assert result.steps == 30 and stats["version"] == 30
    records = [json.loads(line) for line in (tmp_path / "w0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records[:-1]] == list(range(30))
    assert {"worker", "step", "time", "loss", "staleness"} <= set(records[0])
    assert [r["step"] for r in records if "test_accuracy" in r and "final" not in r] == [0, 10, 20, 29]
    assert records[-1]["final"] and records[-1]["test_accuracy"] == result.test_accuracy
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.gpu
@pytest.mark.parametrize("push_early", [False, True])  # True: pinned copies from backward's hooks
def test_a_cuda_worker_trains_like_a_cpu_worker(tmp_path, push_early):
    cpu, _, _ = train_once("cpu", tmp_path / "cpu")
    cuda, result, _ = train_once("cuda", tmp_path / "cuda", push_early=push_early)
    for name in cpu:
        torch.testing.assert_close(cuda[name], cpu[name], rtol=1e-3, atol=1e-4)
    assert result.test_accuracy > 0.5


@pytest.mark.gpu
def test_gradients_leave_the_gpu_through_pinned_buffers():
    p = torch.nn.Parameter(torch.ones(3, device="cuda"))
    p.grad = torch.full((3,), 2.0, device="cuda")
    out = HostGrads({"w": p}, torch.device("cuda")).collect()
    assert out["w"].is_pinned() and out["w"].device.type == "cpu"
    assert torch.equal(out["w"], torch.full((3,), 2.0))


@pytest.mark.gpu
@pytest.mark.parametrize("transport", ["unary", "shm", "tcp"])
def test_pulls_into_cuda_tensors_land_through_one_pinned_mirror_per_parameter(transport):
    from ps import shm

    server = create_server(ServerConfig(mode="async", shm=transport == "shm"))  # tcp: split answers into the mirror
    try:
        with PSClient([server.address], "g", partition_bytes=1 << 16, transport=transport) as c:
            init = {"w": torch.arange(1 << 16, dtype=torch.float32).reshape(256, 256), "b": torch.ones(7)}
            clock = c.setup(init, OptimizerConfig("sgd", lr=1.0))
            into = {n: torch.zeros_like(t, device="cuda") for n, t in init.items()}
            out = c.pull(clock, into=into)
            assert all(out[n] is into[n] for n in init)
            mirror = c._mirrors.get("w", (256, 256))
            assert mirror.is_pinned() and c._mirrors.get("w", (256, 256)).data_ptr() == mirror.data_ptr()
            for n, t in init.items():
                assert torch.equal(into[n].cpu(), t)
            c.push({n: torch.ones_like(t) for n, t in init.items()}, clock)
            c.pull(clock + 1, into=into)
            assert c._mirrors.get("w", (256, 256)).data_ptr() == mirror.data_ptr()  # reused, not allocated anew
            for n, t in init.items():
                assert torch.equal(into[n].cpu(), t - 1)
            assert c.paths() == [transport] and shm.MIN_BYTES <= 4 << 16
    finally:
        server.stop(grace=0)


@pytest.mark.gpu
@pytest.mark.parametrize("local_rank", ["0", "1", "5"])
def test_each_worker_of_a_host_takes_its_own_gpu(monkeypatch, local_rank):
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    device = resolve_device("cuda")
    assert device == torch.device("cuda", int(local_rank) % torch.cuda.device_count())
    assert torch.cuda.current_device() == device.index


def test_the_local_rank_picks_the_gpu_and_must_be_an_integer(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert local_index(3) == 3  # without LOCAL_RANK: the worker's rank
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert local_index(3) == 2
    monkeypatch.setenv("LOCAL_RANK", "two")
    with pytest.raises(InvalidArgument, match=r"LOCAL_RANK \('two'\) must be an integer"):
        local_index(0)


def test_a_tensor_parallel_group_outwaits_its_ranks_retries():
    """A peer retrying a restarting server for --retry-timeout must not time the group out."""
    assert group_timeout(300.0) > 300.0 and group_timeout(1.0) == GROUP_TIMEOUT


def test_running_a_finished_job_again_reports_the_weights_loss_not_nan(tmp_path):
    server = create_server(ServerConfig(mode="sync"))
    try:
        results = []
        for run in range(2):  # the second run finds the servers past the last step
            cfg = WorkerConfig(servers=(server.address,), worker_id="w0", steps=5, device="cpu", eval_every=0,
                               log_dir=str(tmp_path / str(run)))
            torch.manual_seed(cfg.seed)
            data = load_data(cfg.data)
            with PSClient(cfg.servers, cfg.worker_id) as client:
                results.append(train(cfg, client, build_model(cfg.model, data.input_shape, data.num_classes), data))
    finally:
        server.stop()
    again = results[1]
    assert again.final_loss == again.final_loss and 0 < again.final_loss < 10  # a number, not nan
    assert again.test_accuracy == results[0].test_accuracy  # the same weights


def test_loader_worker_processes_give_the_same_training(tmp_path):
    """--loader-workers moves batch preparation to DataLoader processes; the batches, and so the
    weights, are the same."""
    inline, _, _ = train_once("cpu", tmp_path / "inline", steps=6)
    spawned, result, _ = train_once("cpu", tmp_path / "spawned", steps=6, loader_workers=2)
    assert result.steps == 6
    for name in inline:
        assert torch.equal(spawned[name], inline[name]), name
