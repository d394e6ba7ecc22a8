"""Client-side membership against in-process servers on port 0: leases, leave, rejoin, waits."""

import threading
import time

import pytest
import torch

from ps.config import OptimizerConfig, ServerConfig
from ps.errors import PlanMismatch
from ps.proto import ps_pb2 as pb
from ps.server.app import create_server
from ps.worker.client import PSClient

SGD1 = OptimizerConfig("sgd", lr=1.0)


@pytest.fixture
def servers():
    started = []

    def start(n=1, **kw):
        started.extend(create_server(ServerConfig(shard_id=k, num_shards=n, **kw)) for k in range(n))
        return started[-n:]

    yield start
    for s in started:
        s.stop(grace=0)


def clocks(server):
    return server.shard.stats()["clocks"]


def test_leave_stops_the_heartbeat_and_the_worker_stays_gone(servers):
    (srv,) = servers(mode="sync", num_workers=2, worker_timeout=0.4)
    a, b = PSClient([srv.address], "a"), PSClient([srv.address], "b")
    try:
        for c in (a, b):
            c.setup({"w": torch.zeros(4)}, SGD1)
        b.leave()
        time.sleep(0.6)  # several heartbeat intervals
        assert clocks(srv) == {"a": 0}
        a.push({"w": torch.ones(4)}, 0)
        assert torch.equal(a.pull(1)["w"], -torch.ones(4))  # a does not wait for b
    finally:
        a.close()
        b.close()


def test_a_shard_that_is_down_does_not_get_the_worker_evicted_elsewhere(servers):
    s0, s1 = servers(2, mode="async", worker_timeout=0.5)
    c = PSClient([s0.address, s1.address], "a", retry_timeout=30)
    try:
        c.setup({"w": torch.zeros(4), "b": torch.zeros(2)}, SGD1)
        s1.stop(grace=0)
        time.sleep(1.5)
        assert s0.shard.stats()["evictions"] == 0 and "a" in clocks(s0)
    finally:
        c.close()


def test_a_waiting_pull_has_no_deadline(servers):
    (srv,) = servers(mode="sync", num_workers=2)
    a = PSClient([srv.address], "a", rpc_timeout=0.3)
    b = PSClient([srv.address], "b")
    try:
        a.setup({"w": torch.zeros(4)}, SGD1)
        got = []
        t = threading.Thread(target=lambda: got.append(a.pull(0)))
        t.start()
        time.sleep(1.0)  # well past rpc_timeout: the pull is still waiting for the quorum
        assert t.is_alive()
        b.setup({"w": torch.zeros(4)}, SGD1)
        t.join(10)
        assert got and torch.equal(got[0]["w"], torch.zeros(4))
    finally:
        a.close()
        b.close()


def test_a_worker_evicted_while_alive_rejoins_and_resumes_at_the_servers_clock(servers):
    (srv,) = servers(mode="async", num_workers=1, worker_timeout=0.5)
    a = PSClient([srv.address], "a", heartbeat=False)
    try:
        a.setup({"w": torch.zeros(4)}, SGD1)
        for clock in range(3):
            a.push({"w": torch.ones(4)}, clock)
        time.sleep(1.5)  # no heartbeats: evicted
        assert srv.shard.stats()["evictions"] == 1
        assert a.push({"w": torch.ones(4)}, 1)[0]["outcome"] == "DUPLICATE"  # registers again by itself
        assert a.clock_floor == 3
        assert a.push({"w": torch.ones(4)}, a.clock_floor)[0]["outcome"] == "APPLIED"
        assert torch.equal(a.pull(0, observer=True)["w"], torch.full((4,), -4.0))
    finally:
        a.close()


def test_a_plan_for_far_too_many_shards_is_refused_before_any_work(servers):
    (srv,) = servers(mode="async")
    c = PSClient([srv.address], "a")
    try:
        spec = pb.PlanSpec(params=[pb.ParamSpec(name=f"p{i}", dtype="float32", shape=[1000]) for i in range(20)],
                           num_shards=10**7, partition_bytes=4096)
        with pytest.raises(PlanMismatch, match="10000000 shards"):
            c._t.run(c._t.attempt(0, "Init", pb.InitRequest(worker_id="a", plan=spec)))
    finally:
        c.close()


@pytest.mark.parametrize("compress, dtype_bytes", [("none", 4), ("fp16", 2), ("bf16", 2)])
def test_compressed_pushes_carry_fewer_bytes_and_apply_in_fp32(servers, compress, dtype_bytes):
    (srv,) = servers(mode="async")
    c = PSClient([srv.address], "a", compress=compress)
    try:
        c.setup({"w": torch.zeros(1000)}, SGD1)
        before = srv.shard.stats()["bytes_pushed"]
        c.push({"w": torch.full((1000,), 0.5)}, 0)
        assert srv.shard.stats()["bytes_pushed"] - before == 1000 * dtype_bytes
        assert torch.equal(c.pull(1)["w"], torch.full((1000,), -0.5))  # 0.5 is exact in every dtype
    finally:
        c.close()


def test_an_fp16_slice_beyond_its_range_travels_in_bf16_instead_of_as_inf(servers):
    (srv,) = servers(mode="async")
    c = PSClient([srv.address], "a", compress="fp16", partition_bytes=1024)
    try:
        c.setup({"w": torch.zeros(512)}, SGD1)  # two slices of 256
        grad = torch.full((512,), 0.5)
        grad[3] = 1e5  # finite, above fp16's 65504
        before = srv.shard.stats()["bytes_pushed"]
        assert c.push({"w": grad}, 0)[0]["outcome"] == "APPLIED"
        assert srv.shard.stats()["bytes_pushed"] - before == 512 * 2  # that slice in bf16: the same size
        want = grad.clone()
        want[:256] = grad[:256].to(torch.bfloat16).float()
        assert torch.equal(c.pull(1)["w"], -want)
    finally:
        c.close()


def test_topk_values_a_shard_did_not_take_are_owed_again(servers):
    """Error feedback keeps what a dropped or refused push sent: nothing is lost."""
    (srv,) = servers(mode="sync", num_workers=2, backup_workers=1)
    a, b = PSClient([srv.address], "a", compress="topk:0.5"), PSClient([srv.address], "b", compress="topk:0.5")
    try:
        for c in (a, b):
            c.setup({"w": torch.zeros(4)}, SGD1)
        grad = torch.tensor([4.0, 3.0, 2.0, 1.0])
        assert a.push({"w": grad}, 0)[0]["outcome"] == "APPLIED"  # the backup worker's step is complete
        assert b.push({"w": grad}, 0)[0]["outcome"] == "DROPPED"  # too late for it
        assert torch.equal(b._compressor.residual["w#0"], grad)  # what it sent is owed again
        with pytest.raises(Exception, match="sync step 5"):
            b.push({"w": torch.zeros(4)}, 5)  # refused: that step cannot have been pulled
        assert torch.equal(b._compressor.residual["w#0"], grad)
    finally:
        a.close()
        b.close()


def test_topk_owes_again_only_what_the_shards_that_refused_a_push_were_sent(servers):
    """One shard takes its part, the other refuses it (NaN): the taken part is not owed again (it
    would be applied twice), and the refused NaN is not kept (it would poison every later push)."""
    s0, s1 = servers(2, mode="async")
    c = PSClient([s0.address, s1.address], "a", compress="topk:1.0")
    try:
        c.setup({"a": torch.zeros(4), "b": torch.zeros(4)}, SGD1)
        bad = torch.ones(4)
        bad[1] = float("nan")
        for push in (c.push, lambda g, k: c.push_pull(g, k)):
            with pytest.raises(Exception, match="NaN"):
                push({"a": torch.ones(4), "b": bad}, 0)
            assert torch.equal(c._compressor.residual["a#0"], torch.zeros(4)), "a taken part is owed again"
            assert torch.isfinite(c._compressor.residual["b#0"]).all()
        assert {r["outcome"] for r in c.push({"a": torch.zeros(4), "b": torch.ones(4)}, 1)} == {"APPLIED"}
    finally:
        c.close()


def test_an_unknown_gradient_name_is_refused_clearly(servers):
    from ps.errors import InvalidArgument

    (srv,) = servers(mode="async")
    c = PSClient([srv.address], "a")
    try:
        c.setup({"w": torch.zeros(4)}, SGD1)
        for grad in (torch.ones(4), None):
            with pytest.raises(InvalidArgument, match="'nope' names no parameter of the plan"):
                c.push({"w": torch.ones(4), "nope": grad}, 0)
    finally:
        c.close()


def test_an_unknown_compression_is_refused():
    from ps.errors import InvalidArgument

    for spec in ("int8", "topk:0", "topk:2"):
        with pytest.raises(InvalidArgument, match="compress"):
            PSClient(["127.0.0.1:1"], compress=spec, connect_timeout=0.1)


@pytest.mark.parametrize("partition_bytes", [4096, 1 << 22], ids=["several-requests", "one-round-trip"])
def test_push_pull_equals_a_push_then_a_pull(servers, partition_bytes):
    s0, s1 = servers(2, mode="sync", num_workers=1)
    c = PSClient([s0.address, s1.address], "a", partition_bytes=partition_bytes)
    try:
        c.setup({"w": torch.zeros(3000), "b": torch.zeros(5)}, SGD1)
        into = {"w": torch.empty(3000)}
        results, weights = c.push_pull({"w": torch.ones(3000), "b": torch.ones(5)}, 0, names=["w"], into=into)
        assert [r["outcome"] for r in results] == ["APPLIED", "APPLIED"]
        assert set(weights) == {"w"} and weights["w"] is into["w"]
        assert torch.equal(into["w"], -torch.ones(3000))
        assert c.versions == [1, 1]
        assert torch.equal(c.pull(1)["b"], -torch.ones(5))
    finally:
        c.close()


def test_topk_pushes_send_the_largest_entries_and_the_rest_later(servers):
    (srv,) = servers(mode="async")
    c = PSClient([srv.address], "a", compress="topk:0.5")
    try:
        c.setup({"w": torch.zeros(4)}, SGD1)
        before = srv.shard.stats()["bytes_pushed"]
        grad = torch.tensor([4.0, 3.0, 2.0, 1.0])
        c.push({"w": grad}, 0)
        assert srv.shard.stats()["bytes_pushed"] - before == 2 * 8  # two (int32 position, fp32 value) pairs
        assert torch.equal(c.pull(1)["w"], torch.tensor([-4.0, -3.0, 0.0, 0.0]))
        c.push({"w": grad}, 1)  # owed [0, 0, 2, 1] + grad = [4, 3, 4, 2]: positions 0 and 2 go
        assert torch.equal(c.pull(2)["w"], torch.tensor([-8.0, -3.0, -4.0, 0.0]))
    finally:
        c.close()


def test_a_worker_says_it_is_waiting_for_a_server_that_is_down(servers, monkeypatch, caplog):
    import logging

    from ps.errors import Unavailable
    from ps.worker import transport

    monkeypatch.setattr(transport, "WAITING_NOTICE", 0.3)
    (srv,) = servers(mode="async")
    c = PSClient([srv.address], "a", retry_timeout=2.0)
    try:
        c.setup({"w": torch.zeros(4)}, SGD1)
        srv.stop(grace=0)
        with caplog.at_level(logging.WARNING, logger="ps.worker"), pytest.raises(Unavailable):
            c.stats()
    finally:
        c.close()
    notices = [r.getMessage() for r in caplog.records if "waiting for server" in r.getMessage()]
    assert notices and srv.address in notices[0] and "--retry-timeout" in notices[0]


def test_calls_waiting_on_one_server_that_is_down_share_one_notice_per_interval(servers, monkeypatch, caplog):
    import logging

    from ps.errors import Unavailable
    from ps.worker import transport

    monkeypatch.setattr(transport, "WAITING_NOTICE", 0.5)
    (srv,) = servers(mode="async")
    c = PSClient([srv.address], "a", retry_timeout=2.5, partition_bytes=1024)
    try:
        c.setup({"w": torch.zeros(4096)}, SGD1)  # a pull of 16 requests at once
        srv.stop(grace=0)
        with caplog.at_level(logging.WARNING, logger="ps.worker"), pytest.raises(Unavailable):
            c.pull(0)
    finally:
        c.close()
    notices = [r for r in caplog.records if "waiting for server" in r.getMessage()]
    assert 1 <= len(notices) <= 2.5 / 0.5 + 1, [r.getMessage() for r in notices]  # not one per request
