"""Bad requests over real gRPC get a specific status code and error class, and change nothing."""

import grpc
import pytest
import torch

from ps.config import MAX_MESSAGE_BYTES, OptimizerConfig
from ps.errors import InvalidArgument, PlanMismatch, UnknownKey
from ps.proto import ps_pb2 as pb
from ps.proto import ps_pb2_grpc
from ps.serde import optimizer_to_proto, plan_to_proto, tensor_to_proto
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


def refused(call, request):
    """The status code name and the server's error class of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=10)
    return info.value.code().name, dict(info.value.trailing_metadata()).get(ERROR_CLASS_KEY)


def register(client, stub, worker_id) -> int:
    """Register `worker_id`; the clock the shard puts it at (its first push's)."""
    request = pb.RegisterRequest(worker_id=worker_id, plan_fingerprint=client.plan.fingerprint)
    return stub.Register(request, timeout=10).clock


def test_a_push_pull_whose_pull_names_an_unknown_key_is_refused_before_its_push_is_applied(server):
    client, stub = server
    clock = register(client, stub, "pushpull")
    push = push_request(client, [grad(), grad("b#0", torch.ones(2))], worker_id="pushpull", clock=clock)
    before, version, rejected = snapshot(client), client.stats()[0]["version"], client.stats()[0]["rejected"]
    bad = pb.PushPullRequest(push=push, pull_keys=["w#0", "nope#0"])
    assert refused(stub.PushPull, bad) == ("NOT_FOUND", UnknownKey.__name__)
    after = snapshot(client)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert client.stats()[0]["version"] == version and client.stats()[0]["rejected"] == rejected + 1
    # The push was not taken: sent again, it is applied (a push already taken would be a DUPLICATE).
    answer = stub.PushPull(pb.PushPullRequest(push=push, pull_keys=["w#0"]), timeout=10)
    assert answer.push.outcome == pb.PushResponse.APPLIED and answer.push.version == version + 1
    assert torch.equal(snapshot(client)["w"], before["w"] - 1)


@pytest.mark.parametrize("mode", ["async", "ssp"])
def test_clocks_past_the_servers_bound_are_refused_and_the_shard_keeps_answering(mode):
    from tests.conftest import running_cluster

    extra = {"staleness": 2} if mode == "ssp" else {}
    with running_cluster(1, mode, num_workers=1, **extra) as addresses, \
            PSClient(addresses, "good", partition_bytes=4096) as client, \
            grpc.insecure_channel(addresses[0]) as channel:
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        client.setup({"w": torch.arange(10.0)}, OptimizerConfig("sgd", lr=1.0))
        before = snapshot(client)
        for clock in ((1 << 63) - 1, 1 << 62):  # int64's largest, and the server's bound
            push = push_request(client, [grad()], clock=clock)
            assert refused(stub.Push, push) == ("INVALID_ARGUMENT", InvalidArgument.__name__), clock
            assert refused(stub.PushPull, pb.PushPullRequest(push=push, pull_keys=["w#0"])) == (
                "INVALID_ARGUMENT", InvalidArgument.__name__), clock
            for field in ("clock", "seen_version"):
                request = pb.RegisterRequest(worker_id="good", plan_fingerprint=client.plan.fingerprint, **{field: clock})
                assert refused(stub.Register, request) == ("INVALID_ARGUMENT", InvalidArgument.__name__), field
        # A PushPull just below the bound is refused as well: its pull, at clock + 1, is past it.
        assert refused(stub.PushPull, pb.PushPullRequest(push=push_request(client, [grad()], clock=(1 << 62) - 1),
                                                         pull_keys=["w#0"]))[0] == "INVALID_ARGUMENT"
        stats = client.stats()[0]  # Stats, Register and Pull keep working
        assert stats["clocks"]["good"] < 1 << 62 and stats["version"] == 0 and stats["pushes"] == 0
        assert stats["rejected"] == 2 * 4 + 1  # every refusal counted, the Register ones too
        register(client, stub, "good")
        after = snapshot(client)
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert client.push({"w": torch.ones(10)}, 0)[0]["outcome"] == "APPLIED"
        assert torch.equal(client.pull(1)["w"], before["w"] - 1)


def _init(client, tensors, part=0, num_parts=1):
    return pb.InitRequest(worker_id="good", plan_fingerprint=client.plan.fingerprint, plan=plan_to_proto(client.plan),
                          optimizer=optimizer_to_proto(OptimizerConfig("sgd", lr=1.0)), tensors=tensors, part=part,
                          num_parts=num_parts)


INIT_CASES = {
    "a part beyond its part count": dict(part=5, num_parts=2),
    "a negative part": dict(part=-1, num_parts=2),
    "more parts than slices": dict(part=0, num_parts=3),
    "NaN values": dict(nan=True),
    "an infinite value": dict(inf=True),
}


@pytest.mark.parametrize("case", list(INIT_CASES))
def test_a_bad_init_on_an_initialised_shard_is_refused_and_changes_nothing(server, case):
    client, stub = server
    how = dict(INIT_CASES[case])
    w = torch.arange(10.0)
    if how.pop("nan", False):
        w[3] = float("nan")
    if how.pop("inf", False):
        w[0] = float("inf")
    request = _init(client, [tensor_to_proto("w#0", w), tensor_to_proto("b#0", torch.ones(2))], **how)
    before, stats = snapshot(client), client.stats()[0]
    assert refused(stub.Init, request) == ("INVALID_ARGUMENT", InvalidArgument.__name__)
    after, now = snapshot(client), client.stats()[0]
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert now["version"] == stats["version"] and now["rejected"] == stats["rejected"] + 1


def test_a_good_init_on_an_initialised_shard_is_answered_not_applied_and_changes_nothing(server):
    client, stub = server
    before = snapshot(client)
    request = _init(client, [tensor_to_proto("w#0", torch.zeros(10)), tensor_to_proto("b#0", torch.zeros(2))])
    assert stub.Init(request, timeout=10).applied is False  # the check above is not of a shard refusing everything
    after = snapshot(client)
    assert all(torch.equal(before[n], after[n]) for n in before)
