"""The hand-written tensor path writes and reads exactly the messages of ps.proto."""

import pytest
import torch
from google.protobuf.message import DecodeError
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


# -- agreement with protobuf's own parser ----------------------------------------------------------
# Whatever bytes arrive, a reader must see the message protobuf sees (the generated ps_pb2 parsing
# the same bytes), or refuse it where protobuf refuses it.

def _tensors(ts):
    return [(t.key, t.dtype, tuple(t.shape), bytes(t.data), bytes(t.indices)) for t in ts]


def _header(m, field):
    m = type(m).FromString(m.SerializeToString())
    m.ClearField(field)
    return m.SerializeToString(deterministic=True)  # unknown fields included, in the order received


KINDS = {  # reader: (message class, what protobuf's parse reads as, what a reader's result reads as)
    "push": (pb.PushRequest, lambda m: (_header(m, "grads"), _tensors(m.grads)),
             lambda r: (_header(r.header, "grads"), _tensors(r.grads))),
    "pull_response": (pb.PullResponse, lambda m: (_header(m, "tensors"), _tensors(m.tensors)),
                      lambda r: (_header(r.header, "tensors"), _tensors(r.tensors))),
    "push_pull_request": (pb.PushPullRequest,
                          lambda m: (_header(m.push, "grads"), _tensors(m.push.grads), list(m.pull_keys)),
                          lambda r: (_header(r.push.header, "grads"), _tensors(r.push.grads), r.pull_keys)),
    "push_pull_response": (pb.PushPullResponse,
                           lambda m: (m.push.SerializeToString(deterministic=True), _header(m.pull, "tensors"),
                                      _tensors(m.pull.tensors)),
                           lambda r: (r.push.SerializeToString(deterministic=True), _header(r.pull.header, "tensors"),
                                      _tensors(r.pull.tensors))),
}
READERS = {"push": wire.read_push, "pull_response": wire.read_pull_response,
           "push_pull_request": wire.read_push_pull_request, "push_pull_response": wire.read_push_pull_response}


def _protobuf(kind, data):
    cls, theirs, _ = KINDS[kind]
    try:
        return theirs(cls.FromString(data))
    except DecodeError:
        return None


def assert_reads_as_protobuf(kind, data):
    expected = _protobuf(kind, data)
    for read in (READERS[kind], wire.WALKERS[kind]):
        got = read(data)
        if expected is None:
            assert isinstance(got, wire.Malformed), (kind, read, data)
        else:
            assert not isinstance(got, wire.Malformed), (kind, got.reason, data)
            assert KINDS[kind][2](got) == expected, (kind, data)
    return expected


def _len(number, payload):
    return wire.varint(number << 3 | 2) + wire.varint(len(payload)) + payload


def _varint_field(number, value):
    return wire.varint(number << 3) + wire.varint(value)


def _groups(number, depth, inside=b""):
    return wire.varint(number << 3 | 3) * depth + inside + wire.varint(number << 3 | 4) * depth


UNKNOWN = (_varint_field(20, 7) + wire.varint(21 << 3 | 1) + b"8 bytes!" + _len(22, b"xyz")
           + wire.varint(23 << 3 | 5) + b"4byt" + _groups(24, 3, _varint_field(1, 5) + _len(2, b"g")))


def _tensor(key="k", data=b"\0\0\x80\x3f", **kw):
    return pb.Tensor(key=key, dtype="float32", shape=[1], data=data, **kw).SerializeToString()


T1, T2 = _tensor("a#0"), _tensor("b#0", b"\0\0\0\x40")
PUSH1 = pb.PushRequest(worker_id="w", plan_fingerprint="f", clock=5, base_version=2, num_parts=1).SerializeToString()
PUSH2 = pb.PushRequest(clock=7, part=0, no_grad=["z"]).SerializeToString()
PULL1 = pb.PullResponse(version=3, min_clock=1).SerializeToString()


CASES = {
    # A singular message field sent twice: protobuf merges the copies (later scalars win, even a
    # zero written out; repeated fields append), it does not keep only the last.
    "push_pull_request: push twice": ("push_pull_request", _len(1, PUSH1 + _len(5, T1)) + _len(2, b"k1")
                                      + _len(1, PUSH2 + _len(5, T2)) + _len(2, b"k2")),
    "push_pull_request: push twice, a zero clock last": (
        "push_pull_request", _len(1, PUSH1 + _len(5, T1)) + _len(1, _varint_field(3, 0))),
    "push_pull_request: push three times, one empty": (
        "push_pull_request", _len(1, PUSH1) + _len(1, b"") + _len(1, _len(5, T2))),
    "push_pull_response: pull and push twice": (
        "push_pull_response", _len(1, pb.PushResponse(outcome=1, version=4).SerializeToString())
        + _len(2, PULL1 + _len(1, T1)) + _len(1, _varint_field(3, 9)) + _len(2, _varint_field(2, 8) + _len(1, T2))),
    # Scalars, strings and payloads sent twice: the last wins.
    "push: scalars twice": ("push", PUSH1 + _varint_field(3, 11) + _len(1, b"v") + _len(5, T1) + _varint_field(3, 12)),
    "push: a payload twice in one tensor": ("push", _len(5, T1 + _len(4, b"\1\2\3\4") + _len(1, b"k2"))),
    "pull_response: indices twice": ("pull_response", PULL1 + _len(1, _tensor(indices=b"\1\0\0\0") + _len(5, b"\2\0"))),
    # Repeated scalars, packed or not, or both in one message: the same list.
    "push: shape packed": ("push", _len(5, _len(1, b"p") + _len(3, wire.varint(2) + wire.varint(3)))),
    "push: shape unpacked": ("push", _len(5, _len(1, b"p") + _varint_field(3, 2) + _varint_field(3, 3))),
    "push: shape mixed": ("push", _len(5, _varint_field(3, 2) + _len(3, wire.varint(3) + wire.varint(4))
                                  + _varint_field(3, 5))),
    # Unknown fields of every wire type (groups too) at every level are skipped and kept.
    "push: unknown fields everywhere": ("push", UNKNOWN + PUSH1 + _len(5, UNKNOWN + T1 + UNKNOWN) + UNKNOWN),
    "push_pull_request: unknown fields everywhere": (
        "push_pull_request", UNKNOWN + _len(1, UNKNOWN + PUSH1 + _len(5, T1 + UNKNOWN)) + UNKNOWN + _len(2, b"k")),
    "push_pull_response: unknown fields everywhere": (
        "push_pull_response", UNKNOWN + _len(2, UNKNOWN + PULL1 + _len(1, UNKNOWN + T1)) + _len(1, UNKNOWN)),
    # A known field number with another wire type is an unknown field to protobuf.
    "push: grads as a varint": ("push", PUSH1 + _varint_field(5, 3) + _len(5, T1)),
    "push: data as fixed32 and as a group": ("push", _len(5, T1 + wire.varint(4 << 3 | 5) + b"abcd" + _groups(4, 1))),
    "push_pull_request: push as fixed64": ("push_pull_request", _len(1, PUSH1) + wire.varint(1 << 3 | 1) + b"12345678"),
    "push_pull_response: pull as a group": ("push_pull_response", _len(2, PULL1 + _len(1, T1)) + _groups(2, 2)),
    # Tags and lengths of up to 5 bytes, written longer than needed, are accepted; 6 are refused.
    "push: a 5-byte tag on grads": ("push", b"\xaa\x80\x80\x80\x00" + wire.varint(len(T1)) + T1),
    "push: a 6-byte tag on grads": ("push", b"\xaa\x80\x80\x80\x80\x00" + wire.varint(len(T1)) + T1),
    "push: a tag over 32 bits": ("push", b"\xaa\x80\x80\x80\x10" + wire.varint(len(T1)) + T1),
    "push: a 5-byte length on data": ("push", _len(5, _len(1, b"k") + b"\x22\x84\x80\x80\x80\x00abcd")),
    "push: a 6-byte length on data": ("push", _len(5, _len(1, b"k") + b"\x22\x84\x80\x80\x80\x80\x00abcd")),
    "push: an 11-byte varint": ("push", _varint_field(3, 1)[:1] + b"\xff" * 10 + b"\x01"),
    # Malformed groups.
    "push: a group not ended": ("push", PUSH1 + wire.varint(9 << 3 | 3) + _varint_field(1, 1)),
    "push: a group ended by another field": ("push", wire.varint(9 << 3 | 3) + wire.varint(10 << 3 | 4)),
    "push: an end of group alone": ("push", PUSH1 + wire.varint(9 << 3 | 4)),
    "push: wire type 6": ("push", PUSH1 + wire.varint(9 << 3 | 6)),
    "push: field number 0": ("push", PUSH1 + b"\x00\x01"),
}
# Protobuf nests at most 100 levels (messages and groups) below the outermost message.
for depth in (98, 99, 100, 101):
    CASES[f"push: groups {depth} deep in the header"] = ("push", PUSH1 + _groups(9, depth))
    CASES[f"push: groups {depth} deep in a tensor"] = ("push", _len(5, T1 + _groups(9, depth)))
    CASES[f"push_pull_request: groups {depth} deep in a tensor"] = (
        "push_pull_request", _len(1, _len(5, T1 + _groups(9, depth))))


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_reader_reads_what_protobuf_reads_or_refuses_what_it_refuses(case):
    kind, data = CASES[case]
    assert_reads_as_protobuf(kind, data)


def test_the_cases_cover_merging_and_refusing():
    """The cases above are not vacuous: protobuf accepts most, refuses some, and merges copies."""
    refused = [c for c, (kind, data) in CASES.items() if _protobuf(kind, data) is None]
    assert sorted(refused) == sorted([
        "push: a 6-byte tag on grads", "push: a tag over 32 bits", "push: a 6-byte length on data",
        "push: an 11-byte varint", "push: a group not ended", "push: a group ended by another field",
        "push: an end of group alone", "push: wire type 6", "push: field number 0",
        "push: groups 101 deep in the header", "push: groups 100 deep in a tensor", "push: groups 101 deep in a tensor",
        "push_pull_request: groups 99 deep in a tensor", "push_pull_request: groups 100 deep in a tensor",
        "push_pull_request: groups 101 deep in a tensor"])
    merged = wire.WALKERS["push_pull_request"](CASES["push_pull_request: push twice"][1])
    assert (merged.push.header.worker_id, merged.push.header.clock) == ("w", 7)
    assert [t.key for t in merged.push.grads] == ["a#0", "b#0"] and merged.pull_keys == ["k1", "k2"]


@settings(max_examples=2000, deadline=None)
@given(st.sampled_from(sorted(KINDS)), st.binary(max_size=200))
def test_any_bytes_read_as_protobuf_reads_them(kind, data):
    assert_reads_as_protobuf(kind, data)


_PIECES = {  # fields that may make up each message, in any order and number
    "push": [PUSH1, PUSH2, _len(5, T1), _len(5, T2), _len(5, T1 + UNKNOWN + _len(4, b"")), UNKNOWN,
             _varint_field(5, 1), _len(8, b"ng"), _groups(5, 1)],
    "pull_response": [PULL1, _len(1, T1), _len(1, _tensor(indices=b"\3\0\0\0")), UNKNOWN, _varint_field(1, 4)],
}
_PIECES["push_pull_request"] = [_len(1, b"".join(p)) for p in
                                ((PUSH1, _len(5, T1)), (PUSH2,), (_len(5, T2), UNKNOWN), ())] + [
    _len(2, b"k"), UNKNOWN, _varint_field(1, 2)]
_PIECES["push_pull_response"] = [_len(2, PULL1 + _len(1, T1)), _len(2, _len(1, T2)), _len(2, UNKNOWN),
                                 _len(1, pb.PushResponse(outcome=2).SerializeToString()), _len(1, _varint_field(2, 6)),
                                 UNKNOWN, _groups(2, 1)]


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_messages_made_of_repeated_and_unknown_fields_read_as_protobuf_reads_them(data):
    kind = data.draw(st.sampled_from(sorted(KINDS)))
    pieces = data.draw(st.lists(st.sampled_from(_PIECES[kind]), max_size=8))
    message = b"".join(pieces)
    assert assert_reads_as_protobuf(kind, message) is not None
    big = message + _len(30, b"\0" * wire.SMALL)  # an unknown field makes it large: the walker reads it
    assert_reads_as_protobuf(kind, big)


def test_an_answer_by_reference_reads_back_and_garbage_is_refused_with_value_error():
    meta = pb.PullResponse(version=7, min_clock=2, tensors=[pb.Tensor(key="w#0", dtype="float32", shape=[4]),
                                                            pb.Tensor(key="w#1", dtype="float32", shape=[2])])
    frame = wire.stream_ref_answer(9, 123, meta.SerializeToString(), [("11:5", 1 << 20, 7), ("11:6", 2 << 20, 2 ** 64 - 1)],
                                   [(1, 64), (0, 4096)]).tobytes()
    rid, status, body = wire.read_stream_answer(frame)
    assert (rid, status) == (9, wire.IN_REF)
    lease, header, chunks, refs = wire.read_ref_answer(body)
    assert (lease, header, chunks, refs) == (123, meta, [("11:5", 1 << 20, 7), ("11:6", 2 << 20, 2 ** 64 - 1)],
                                             [(1, 64), (0, 4096)])
    for bad in (body[:-1], bytes(body) + b"\x00", body[:5], b""):  # cut, too long, no head, empty
        with pytest.raises(ValueError):
            wire.read_ref_answer(memoryview(bytes(bad)))
    wrong = wire.stream_ref_answer(1, 1, meta.SerializeToString(), [("11:5", 1 << 20, 0)], [(0, 64), (1, 64)]).tobytes()
    with pytest.raises(ValueError, match="do not match"):  # a tensor in a chunk the answer does not name
        wire.read_ref_answer(wire.read_stream_answer(wrong)[2])


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=128))
def test_any_bytes_read_as_an_answer_by_reference_or_a_release_raise_value_error_only(data):
    for read in (wire.read_ref_answer, wire.read_release):
        try:
            read(memoryview(data))
        except ValueError:
            pass


def test_a_release_names_u64_leases():
    frame = wire.stream_release([1, 2 ** 64 - 1])
    req = wire.read_stream_request(frame)
    assert (req.code, req.rid) == (wire.RELEASE, 0) and wire.read_release(req.body) == [1, 2 ** 64 - 1]
    with pytest.raises(ValueError, match="u64"):
        wire.read_release(memoryview(b"\x01" * 9))
