"""Overlapping communication with computation, on real server processes: gradients pushed as
backward produces them (`--push-early`) and the next step's weights pulled while computing
(`--prefetch`)."""

import json
import time

import pytest
import torch

from ps.config import OptimizerConfig, WorkerConfig
from ps.data import load_data
from ps.errors import InvalidArgument
from ps.models import build_model
from ps.sharding import ParamSpec
from ps.worker.client import PSClient
from ps.worker.trainer import EarlyPush, HostGrads, train

PARTITION = 4096  # the mlp's layers split into many slices, and each shard's push into several parts


def _train(addresses, tmp_path, steps=40, **overrides):
    cfg = WorkerConfig(servers=tuple(addresses), worker_id="w0", steps=steps, device="cpu", eval_every=0,
                       partition_bytes=PARTITION, log_dir=str(tmp_path), progress=False, **overrides)
    torch.manual_seed(cfg.seed)
    data = load_data(cfg.data)
    net = build_model(cfg.model, data.input_shape, data.num_classes)
    with PSClient(cfg.servers, cfg.worker_id, partition_bytes=PARTITION) as client:
        result = train(cfg, client, net, data)
        stats = client.stats()
    records = [json.loads(line) for line in (tmp_path / "w0.jsonl").read_text().splitlines()]
    return {n: p.detach().clone() for n, p in net.named_parameters()}, result, stats, records


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_pushing_gradients_during_backward_gives_the_same_weights_as_pushing_after(cluster, tmp_path, micro_batches):
    runs = {}
    for early in (False, True):
        with cluster(2, "sync") as addresses:
            runs[early] = _train(addresses, tmp_path / str(early), push_early=early, micro_batches=micro_batches)
    (plain, _, plain_stats, _), (early, result, stats, records) = runs[False], runs[True]
    assert result.steps == 40 and [s["version"] for s in stats] == [40, 40]
    assert [s["pushes"] for s in stats] == [s["pushes"] for s in plain_stats]
    for name in plain:
        assert torch.equal(early[name], plain[name]), name
    assert all(r["staleness"] == 0 for r in records if "final" not in r)


def test_a_push_stream_sends_each_request_once_its_gradients_are_in(cluster):
    with cluster(2, "async") as addresses:
        init = {"a": torch.zeros(3000), "b": torch.zeros(3000)}  # a and b: separate requests (PARTITION)
        with PSClient(addresses, "w0", partition_bytes=PARTITION) as c:
            c.setup(init, OptimizerConfig("sgd", lr=1.0))
            stream = c.push_stream(0, {n: t.dtype for n, t in init.items()})
            stream.add("a", torch.ones(3000))
            deadline = time.monotonic() + 30
            while sum(s["bytes_pushed"] for s in c.stats()) < 4 * 3000:  # a's parts arrived, b not yet given
                assert time.monotonic() < deadline, "a's requests did not go out before b was added"
                time.sleep(0.01)
            with pytest.raises(InvalidArgument, match="already added"):
                stream.add("a", torch.ones(3000))
            with pytest.raises(InvalidArgument, match=r"shape \(2,\), expected \(3000,\)"):
                stream.add("b", torch.ones(2))
            with pytest.raises(InvalidArgument, match="'c' is not part of this push"):
                stream.add("c", torch.ones(3))
            results = stream.finish()  # b never added: it has no gradient
            assert {r["outcome"] for r in results} == {"APPLIED"}
            weights = c.pull(1)
        assert torch.equal(weights["a"], torch.full((3000,), -1.0))
        assert torch.equal(weights["b"], torch.zeros(3000))


def test_a_shard_holding_none_of_the_streamed_tensors_still_sees_the_step(cluster):
    """As a TP rank's push: its keys live on one shard; the other must still count its step."""
    with cluster(2, "sync") as addresses:
        init = {"a": torch.zeros(3000), "b": torch.zeros(3)}
        with PSClient(addresses, "w0", partition_bytes=PARTITION) as c:
            c.setup(init, OptimizerConfig("sgd", lr=1.0))
            stream = c.push_stream(0, {"b": torch.float32})
            stream.add("b", torch.ones(3))
            assert len(stream.finish()) == 2
            weights = c.pull_async(1).result(timeout=60)  # sync: waits for step 0 on both shards
            assert [s["version"] for s in c.stats()] == [1, 1]
        assert torch.equal(weights["b"], torch.full((3,), -1.0)) and torch.equal(weights["a"], init["a"])


class Two(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))


def test_a_gradient_missing_from_the_last_micro_batch_goes_with_what_earlier_ones_accumulated(cluster):
    with cluster(2, "async") as addresses:
        m = Two()
        with PSClient(addresses, "w0") as c:
            c.setup(dict(m.named_parameters()), OptimizerConfig("sgd", lr=1.0))
            early = EarlyPush(c, HostGrads(dict(m.named_parameters()), torch.device("cpu")))
            try:
                early.begin(0)
                (2 * m.a + 3 * m.b).sum().backward()  # an earlier micro-batch: both get gradients
                early.arm()
                (5 * m.a).sum().backward()  # the last one: only a
                early.finish()
            finally:
                early.close()
            weights = c.pull(1)
        assert torch.equal(weights["a"], torch.full((4,), 1.0 - 7.0))
        assert torch.equal(weights["b"], torch.full((4,), 1.0 - 3.0))


class _SlowCopy:
    """Stands for a CUDA event whose copy completes late: the copier thread waits on it."""

    def record(self):
        pass

    def synchronize(self):
        time.sleep(0.3)


def test_an_early_push_whose_copy_is_still_in_flight_is_not_sent_again(cluster, monkeypatch):
    """The CUDA path of --push-early on CPU: each gradient goes through a host buffer and a copier
    thread that waits for the copy's event. `finish` runs while those copies are still in flight;
    it must not hand the same gradients over a second time."""
    monkeypatch.setattr(torch.cuda, "Event", _SlowCopy)
    with cluster(2, "async") as addresses:
        m = Two()
        with PSClient(addresses, "w0") as c:
            c.setup(dict(m.named_parameters()), OptimizerConfig("sgd", lr=1.0))
            host = HostGrads(dict(m.named_parameters()), torch.device("cpu"))
            host.buffers = {n: torch.empty(4) for n in host.params}  # as pinned buffers would be
            early = EarlyPush(c, host)
            assert early.cuda
            try:
                for clock in (0, 1):
                    early.begin(clock)
                    early.arm()
                    (2 * m.a + 3 * m.b).sum().backward()
                    results = early.finish()  # the copies of a and b are still in flight here
                    assert {r["outcome"] for r in results} == {"APPLIED"}
                    m.zero_grad()
            finally:
                early.close()
            weights = c.pull(2)
        assert torch.equal(weights["a"], torch.full((4,), 1.0 - 4.0))
        assert torch.equal(weights["b"], torch.full((4,), 1.0 - 6.0))


def test_a_prefetch_that_registers_again_keeps_the_workers_own_step(cluster):
    """Evicted before the prefetch for step 2 runs: it must register at step 1, where the worker
    is, so that the push for step 1 that follows is applied, not taken for a duplicate."""
    with cluster(1, "async", worker_timeout=0.5) as addresses:
        with PSClient(addresses, "w0", heartbeat=False) as c:
            c.setup({"w": torch.zeros(4)}, OptimizerConfig("sgd", lr=1.0))
            c.push({"w": torch.ones(4)}, 0)
            deadline = time.monotonic() + 30
            while c.stats()[0]["evictions"] == 0:
                assert time.monotonic() < deadline, "the silent worker was not evicted"
                time.sleep(0.1)
            c.prefetch(2).install({})
            assert c.push({"w": torch.ones(4)}, 1)[0]["outcome"] == "APPLIED"
            assert torch.equal(c.pull(2)["w"], torch.full((4,), -2.0))


def test_prefetching_reads_weights_one_step_older_and_still_trains(cluster, tmp_path):
    sgd = OptimizerConfig("sgd", lr=0.1)
    with cluster(2, "async") as addresses:
        weights, result, stats, records = _train(addresses, tmp_path, steps=230, prefetch=True, push_early=True,
                                                 optimizer=sgd)
        with PSClient(addresses, partition_bytes=PARTITION, heartbeat=False) as obs:
            obs.attach([ParamSpec(n, tuple(t.shape)) for n, t in weights.items()])
            final = obs.pull(0, observer=True)
    assert [s["version"] for s in stats] == [230, 230]
    staleness = [r["staleness"] for r in records if "final" not in r]
    # With one worker, every weight read is one push behind: prefetched before the last push went out.
    # (A prefetch the server happened to answer after that push reads 0; the first step reads 0.)
    assert max(staleness) == 1 and sum(staleness) >= 0.8 * len(staleness)
    for name in weights:  # the loop ends by pulling the weights after the last step
        assert torch.equal(weights[name], final[name]), name
    assert result.test_accuracy > 0.85


def test_prefetch_is_refused_in_sync_mode(cluster, tmp_path):
    with cluster(1, "sync") as addresses:
        with pytest.raises(InvalidArgument, match="prefetch needs async or ssp mode"):
            _train(addresses, tmp_path, prefetch=True)
