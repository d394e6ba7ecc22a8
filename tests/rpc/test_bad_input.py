"""Bad requests over real gRPC get a specific status code and error class, and change nothing."""

import grpc
import pytest
import torch

from ps.config import MAX_MESSAGE_BYTES, OptimizerConfig
from ps.errors import InvalidArgument, PlanMismatch, UnknownKey
from ps.proto import ps_pb2 as pb
from ps.proto import ps_pb2_grpc
from ps.serde import optimizer_to_proto, tensor_to_proto
from ps.server.servicer import ERROR_CLASS_KEY
from ps.worker.client import PSClient


@pytest.fixture(scope="module")
def server():
    from tests.conftest import running_cluster

    with running_cluster(1, "async", num_workers=1) as addresses:
        client = PSClient(addresses, "good", partition_bytes=4096)
        client.setup({"w": torch.arange(10.0), "b": torch.ones(2)}, OptimizerConfig("sgd", lr=1.0))
        channel = grpc.insecure_channel(addresses[0], options=[("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)])
        yield client, ps_pb2_grpc.ParameterServerStub(channel)
        channel.close()
        client.close()


def snapshot(client):
    return client.pull(0, observer=True)


def push_request(client, grads, **overrides):
    fields = dict(worker_id="good", plan_fingerprint=client.plan.fingerprint, clock=0, base_version=0,
                  grads=grads, part=0, num_parts=1)
    fields.update(overrides)
    return pb.PushRequest(**fields)


def grad(key="w#0", t=None):
    return tensor_to_proto(key, torch.ones(10) if t is None else t)


CASES = {
    "wrong shape": (lambda c: push_request(c, [grad(t=torch.ones(11))]), "INVALID_ARGUMENT", InvalidArgument),
    "wrong dtype": (lambda c: push_request(c, [pb.Tensor(key="w#0", dtype="int64", shape=[10], data=b"\0" * 80)]),
                    "INVALID_ARGUMENT", InvalidArgument),
    "unknown key": (lambda c: push_request(c, [grad("nope#0")]), "NOT_FOUND", UnknownKey),
    "plan mismatch": (lambda c: push_request(c, [grad()], plan_fingerprint="f" * 16), "FAILED_PRECONDITION", PlanMismatch),
    "NaN gradient": (lambda c: push_request(c, [grad(t=torch.tensor([float("nan")] * 10))]), "INVALID_ARGUMENT",
                     InvalidArgument),
    "truncated bytes": (lambda c: push_request(c, [pb.Tensor(key="w#0", dtype="float32", shape=[10], data=b"\0" * 39)]),
                        "INVALID_ARGUMENT", InvalidArgument),
    "negative clock": (lambda c: push_request(c, [grad()], clock=-3), "INVALID_ARGUMENT", InvalidArgument),
    "part out of range": (lambda c: push_request(c, [grad()], part=5, num_parts=2), "INVALID_ARGUMENT",
                          InvalidArgument),
    "duplicate keys": (lambda c: push_request(c, [grad(), grad()]), "INVALID_ARGUMENT", InvalidArgument),
    "sparse tensor declaring 2**40 elements": (
        lambda c: push_request(c, [pb.Tensor(key="w#0", dtype="float32", shape=[1 << 40], data=b"\0" * 4,
                                             indices=(0).to_bytes(4, "little"))]), "INVALID_ARGUMENT", InvalidArgument),
    "sparse tensors declaring more elements than the shard holds": (
        lambda c: push_request(c, [pb.Tensor(key=f"w#{i}", dtype="float32", shape=[10], data=b"\0" * 4,
                                             indices=(0).to_bytes(4, "little")) for i in range(2)]),
        "INVALID_ARGUMENT", InvalidArgument),
    "sparse position out of range": (
        lambda c: push_request(c, [pb.Tensor(key="w#0", dtype="float32", shape=[10], data=b"\0" * 4,
                                             indices=(10).to_bytes(4, "little"))]), "INVALID_ARGUMENT", InvalidArgument),
}


@pytest.mark.parametrize("method", ["Push", "PushPull"])
@pytest.mark.parametrize("payload", [b"\xff" * 7, b"\x2a\x7fab", b"\x0b", (b"\x0a\x80\x80\x80\x80\x08")],
                         ids=["overlong-varint", "length-past-end", "group-wire-type", "huge-declared-length"])
def test_malformed_bytes_are_refused_as_invalid_argument_and_change_nothing(server, method, payload):
    client, _ = server
    before, rejected = snapshot(client), client.stats()[0]["rejected"]
    with grpc.insecure_channel(client.servers[0]) as channel:
        call = channel.unary_unary(f"/ps.ParameterServer/{method}")  # raw bytes, no serializer
        with pytest.raises(grpc.RpcError) as info:
            call(payload, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "malformed message" in info.value.details()
    after = snapshot(client)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert client.stats()[0]["rejected"] == rejected + 1


@pytest.mark.parametrize("case", list(CASES))
def test_bad_push_is_refused_with_its_status_and_changes_nothing(server, case):
    client, stub = server
    build, code, cls = CASES[case]
    before, rejected = snapshot(client), client.stats()[0]["rejected"]
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(build(client), timeout=10)
    assert info.value.code().name == code
    assert dict(info.value.trailing_metadata())[ERROR_CLASS_KEY] == cls.__name__
    after = snapshot(client)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert client.stats()[0]["rejected"] == rejected + 1


def test_the_client_raises_the_servers_error_class_with_its_message(server):
    client, _ = server
    with pytest.raises(InvalidArgument, match="NaN"):
        client.push({"w": torch.full((10,), float("nan")), "b": torch.ones(2)}, 0)
    other = PSClient(client.servers, "other")
    try:
        with pytest.raises(PlanMismatch, match="fingerprint"):
            other.setup({"w": torch.zeros(11)}, OptimizerConfig("sgd", lr=1.0))
    finally:
        other.close()


def test_an_oversized_message_is_refused_by_the_transport(server):
    client, stub = server
    huge = pb.Tensor(key="w#0", dtype="float32", shape=[MAX_MESSAGE_BYTES // 4 + 1024],
                     data=b"\0" * (MAX_MESSAGE_BYTES + 4096))
    with pytest.raises(grpc.RpcError) as info:
        stub.Push(push_request(client, [huge]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_good_push_still_works_after_all_that(server):
    client, _ = server
    before = snapshot(client)["w"]
    assert client.push({"w": torch.ones(10), "b": torch.ones(2)}, 50)[0]["outcome"] == "APPLIED"
    assert torch.equal(snapshot(client)["w"], before - 1)


def test_init_with_a_wrong_plan_is_refused(server):
    client, stub = server
    spec = pb.PlanSpec(params=[pb.ParamSpec(name="w", dtype="float32", shape=[10])], num_shards=3,
                       partition_bytes=4096)
    with pytest.raises(grpc.RpcError) as info:
        stub.Init(pb.InitRequest(worker_id="x", plan_fingerprint="0" * 16, plan=spec,
                                 optimizer=optimizer_to_proto(OptimizerConfig("sgd", lr=1.0))), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_observers_need_the_plan_to_read(server):
    _, stub = server
    with pytest.raises(grpc.RpcError) as info:
        stub.Pull(pb.PullRequest(worker_id="", plan_fingerprint="bad", keys=["w#0"]), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
