"""The hand-written tensor path writes and reads exactly the messages of ps.proto."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ps import wire
from ps.proto import ps_pb2 as pb
from ps.serde import dense_frame, sparse_frame, tensor_from_proto


def _push():
    return wire.push_frame(
        pb.PushRequest(worker_id="w", plan_fingerprint="f", clock=3, base_version=2, part=1, num_parts=2),
        [dense_frame("a#0", torch.arange(6.0).reshape(2, 3)), dense_frame("h#0", torch.ones(3, dtype=torch.bfloat16)),
         sparse_frame("s#0", [8], torch.tensor([1, 5]), torch.tensor([2.0, -1.0])), dense_frame("e#0", torch.ones(0))])


def test_a_written_push_is_the_protobuf_message():
    m = pb.PushRequest.FromString(_push().tobytes())
    assert (m.worker_id, m.plan_fingerprint, m.clock, m.base_version, m.part, m.num_parts) == ("w", "f", 3, 2, 1, 2)
    assert [(g.key, g.dtype, list(g.shape)) for g in m.grads] == [
        ("a#0", "float32", [2, 3]), ("h#0", "bfloat16", [3]), ("s#0", "float32", [8]), ("e#0", "float32", [0])]
    assert torch.equal(tensor_from_proto(m.grads[0]), torch.arange(6.0).reshape(2, 3))
    assert torch.equal(tensor_from_proto(m.grads[2]), torch.tensor([0, 2.0, 0, 0, 0, -1.0, 0, 0]))


READ_PUSH = [wire.read_push, wire.WALKERS["push"]]  # small messages: protobuf's parser; else the field walker


@pytest.mark.parametrize("read_push", READ_PUSH)
def test_a_protobuf_push_reads_the_same_as_a_written_one(read_push):
    ours = read_push(_push().tobytes())
    theirs = read_push(pb.PushRequest.FromString(_push().tobytes()).SerializeToString())
    for got in (ours, theirs):
        assert got.header.clock == 3 and len(got.header.grads) == 0
        assert [t.key for t in got.grads] == ["a#0", "h#0", "s#0", "e#0"]
        assert [torch.equal(tensor_from_proto(a), tensor_from_proto(b)) for a, b in zip(got.grads, ours.grads)] == [True] * 4
    assert isinstance(ours.grads[0].data, memoryview)  # no copy of the payload


@pytest.mark.parametrize("walk", [False, True])
def test_push_pull_messages_nest_both_ways(walk):
    read_request = wire.WALKERS["push_pull_request"] if walk else wire.read_push_pull_request
    read_response = wire.WALKERS["push_pull_response"] if walk else wire.read_push_pull_response
    request = wire.push_pull_request_frame(_push(), ["a#0", "b#1"])
    assert list(pb.PushPullRequest.FromString(request.tobytes()).pull_keys) == ["a#0", "b#1"]
    got = read_request(request.tobytes())
    assert got.pull_keys == ["a#0", "b#1"] and got.push.header.num_parts == 2 and len(got.push.grads) == 4
    pull = wire.pull_response_frame(7, 2, [dense_frame("a#0", torch.ones(4))])
    response = wire.push_pull_response_frame(pb.PushResponse(outcome=pb.PushResponse.APPLIED, version=7), pull)
    back = read_response(response.tobytes())
    assert back.push.version == 7 and (back.pull.header.version, back.pull.header.min_clock) == (7, 2)
    assert torch.equal(tensor_from_proto(back.pull.tensors[0]), torch.ones(4))
    assert pb.PushPullResponse.FromString(response.tobytes()).pull.tensors[0].key == "a#0"


@pytest.mark.parametrize("read_push", READ_PUSH)
def test_the_last_occurrence_of_a_payload_wins_as_in_protobuf(read_push):
    t = pb.Tensor(key="k", dtype="float32", shape=[1], data=b"\0\0\0\0")
    raw = pb.PushRequest(grads=[t]).SerializeToString()[2:]  # the Tensor's bytes alone
    doubled = raw + wire.varint(4 << 3 | 2) + wire.varint(4) + b"\0\0\x80\x3f"  # data again: 1.0
    msg = wire.varint(5 << 3 | 2) + wire.varint(len(doubled)) + doubled
    assert bytes(read_push(msg).grads[0].data) == pb.PushRequest.FromString(msg).grads[0].data


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=256))
def test_any_bytes_read_as_a_message_or_malformed_never_an_exception(data):
    for read in (wire.read_push, wire.read_pull_response, wire.read_push_pull_request, wire.read_push_pull_response,
                 *wire.WALKERS.values()):
        got = read(data)
        assert isinstance(got, (wire.Malformed, wire.PushIn, wire.PullIn, wire.PushPullIn, wire.PushPullOut))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 40))
def test_corrupted_real_pushes_never_raise(noise, at):
    data = bytearray(_push().tobytes())
    data[at:at + len(noise)] = noise
    for read_push in READ_PUSH:
        assert isinstance(read_push(bytes(data)), (wire.Malformed, wire.PushIn))


def test_large_messages_are_walked_and_small_ones_parsed_to_the_same_result():
    big = wire.push_frame(pb.PushRequest(worker_id="w", clock=1, num_parts=1),
                          [dense_frame("a#0", torch.arange(float(wire.SMALL)))]).tobytes()
    assert len(big) > wire.SMALL
    got = wire.read_push(big)
    assert got.grads[0].data.obj is big  # walked: the payload is a view of the received bytes
    assert got.header.clock == 1 and torch.equal(tensor_from_proto(got.grads[0]), torch.arange(float(wire.SMALL)))
    small = _push().tobytes()
    assert len(small) <= wire.SMALL
    a, b = wire.read_push(small), wire.WALKERS["push"](small)
    assert a.header == b.header and [bytes(t.data) for t in a.grads] == [bytes(t.data) for t in b.grads]
