"""Property-based fuzzing of a real ps-server process: over 10,000 malformed or hostile requests
(random bytes to every method; pushes with wrong shapes and dtypes, huge declared sizes, unknown
and duplicate keys, negative clocks and versions, NaN/Inf, sparse positions out of range, plan
mismatches; hostile registrations and inits). The server never crashes, every answer carries a
specific status code (never INTERNAL or UNKNOWN), and the parameters are unchanged afterwards.
The same requests go on the stream path too, inline and through shared memory."""

import math
import queue
import struct

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ps import shm, wire
from ps.config import OptimizerConfig
from ps.proto import ps_pb2 as pb
from ps.worker.client import PSClient

METHODS = ["Register", "Init", "Pull", "Push", "PushPull", "Heartbeat", "Leave", "Stats"]
SPECIFIC = {"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED",
            "OUT_OF_RANGE"}
BATCH = 8          # requests per example
EXAMPLES = 1300    # 1300 x 8 = 10,400 requests
COUNT = {"requests": 0, "codes": {}}


@pytest.fixture(scope="module")
def target():
    from tests.conftest import running_cluster

    with running_cluster(1, "async", num_workers=1, worker_timeout=600.0) as addresses:
        good = PSClient(addresses, "good", heartbeat=False)
        good.setup({"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5)}, OptimizerConfig("adam", lr=0.1))
        channel = grpc.insecure_channel(addresses[0], options=[("grpc.max_send_message_length", 1 << 28)])
        calls = {m: channel.unary_unary(f"/ps.ParameterServer/{m}") for m in METHODS}  # raw bytes both ways
        before = good.pull(0, observer=True)
        yield good, calls
        after = good.pull(0, observer=True)
        assert all(torch.equal(before[k], after[k]) for k in before), "the fuzzing changed the parameters"
        channel.close()
        good.close()


floats = st.sampled_from([0.0, 1.0, -1e30, float("nan"), float("inf"), -float("inf"), 3.5])
keys = st.sampled_from(["w#0", "b#0", "nope#0", "", "w#1", "w", "\u00e9#0", "w#0" * 40])
dtypes = st.sampled_from(["float32", "float16", "bfloat16", "float64", "int64", "bool", "", "complex64", "x" * 30])
shapes = st.lists(st.integers(-3, 2**40), max_size=10)


@st.composite
def hostile_tensor(draw):
    key, dtype, shape = draw(keys), draw(dtypes), draw(shapes)
    n = draw(st.integers(0, 16))
    data = b"".join(struct.pack("<f", draw(floats)) for _ in range(n)) + draw(st.binary(max_size=3))
    t = pb.Tensor(key=key, dtype=dtype, shape=shape, data=data)
    if draw(st.booleans()):
        t.indices = b"".join(struct.pack("<i", draw(st.integers(-2**31, 2**31 - 1))) for _ in range(draw(st.integers(0, 6))))
    return t


def _wrong_push(draw, fp):
    """A push from the good worker that is wrong in at least one way (so it can never apply)."""
    flaw = draw(st.sampled_from(["nan", "shape", "key", "dtype", "clock", "plan", "dup", "base", "parts", "random"]))
    grads = [pb.Tensor(key="w#0", dtype="float32", shape=[12], data=torch.ones(12).numpy().tobytes())]
    req = pb.PushRequest(worker_id="good", plan_fingerprint=fp, clock=draw(st.integers(0, 10**6)), base_version=0,
                         part=0, num_parts=1)
    if flaw == "nan":
        grads[0].data = torch.tensor([float("nan")] * 12).numpy().tobytes()
    elif flaw == "shape":
        grads[0].shape[:] = [draw(st.integers(13, 2**40))]
    elif flaw == "key":
        grads[0].key = "nope#0"
    elif flaw == "dtype":
        grads[0].dtype = "int64"
    elif flaw == "clock":
        req.clock = draw(st.integers(-2**63, -1))
    elif flaw == "plan":
        req.plan_fingerprint = "0" * 16
    elif flaw == "dup":
        grads.append(grads[0])
    elif flaw == "base":
        req.base_version = draw(st.integers(-2**63, -1))
    elif flaw == "parts":
        req.part, req.num_parts = draw(st.sampled_from([(2, 2), (0, 0), (-1, 3), (0, 2**31 - 1)]))
    else:
        grads = draw(st.lists(hostile_tensor(), min_size=1, max_size=4))
        req.worker_id = draw(st.sampled_from(["stranger", "", "good"]))
        if req.worker_id == "good":
            grads[0].key = "nope#0"  # never a gradient that could apply
    req.grads.extend(grads)
    return req


@st.composite
def request(draw, fp):
    method = draw(st.sampled_from(METHODS))
    if draw(st.integers(0, 3)) == 0:
        return method, draw(st.binary(max_size=200))
    if method in ("Push", "PushPull"):
        push = _wrong_push(draw, fp)
        if method == "Push":
            return method, push.SerializeToString()
        keys_ = draw(st.lists(keys, max_size=4))
        return method, pb.PushPullRequest(push=push, pull_keys=keys_).SerializeToString()
    if method == "Pull":
        return method, pb.PullRequest(worker_id=draw(st.sampled_from(["", "good", "stranger"])),
                                      plan_fingerprint=draw(st.sampled_from([fp, "bad", ""])),
                                      clock=draw(st.integers(-2**63, -1)) if draw(st.booleans()) else 0,
                                      keys=draw(st.lists(keys, max_size=5))).SerializeToString()
    if method == "Register":
        return method, pb.RegisterRequest(worker_id=draw(st.sampled_from(["", "x", "y" * 300])),
                                          plan_fingerprint=draw(st.sampled_from([fp, "bad"])),
                                          clock=draw(st.integers(-2**63, 2**63 - 1)),
                                          seen_version=draw(st.integers(-2**63, -1))).SerializeToString()
    if method == "Init":
        plan = pb.PlanSpec(params=[pb.ParamSpec(name=draw(keys), dtype=draw(dtypes), shape=draw(shapes))],
                           num_shards=draw(st.integers(-5, 5)), partition_bytes=draw(st.integers(-2**40, 2**40)))
        opt = pb.OptimizerSpec(name=draw(st.sampled_from(["sgd", "adam", "nope", ""])), lr=draw(floats))
        return method, pb.InitRequest(worker_id=draw(st.sampled_from(["good", "stranger", ""])),
                                      plan_fingerprint=draw(st.sampled_from([fp, "bad"])), plan=plan, optimizer=opt,
                                      tensors=draw(st.lists(hostile_tensor(), max_size=3)),
                                      part=draw(st.integers(-3, 3)), num_parts=draw(st.integers(-3, 3))).SerializeToString()
    worker = draw(st.sampled_from(["stranger", "", "z" * 1000]))
    return method, pb.WorkerRef(worker_id=worker).SerializeToString()


def test_ten_thousand_hostile_requests_get_specific_codes_and_change_nothing(target):
    good, calls = target
    fp = good.plan.fingerprint

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.lists(request(fp), min_size=BATCH, max_size=BATCH))
    def fuzz(batch):
        for method, payload in batch:
            COUNT["requests"] += 1
            try:
                calls[method](payload, timeout=30)
                code = "OK"
            except grpc.RpcError as e:
                code = e.code().name
                assert code in SPECIFIC, f"{method}: {code} {e.details()!r} for {payload[:80]!r}"
            COUNT["codes"][code] = COUNT["codes"].get(code, 0) + 1
            if method in ("Push", "PushPull"):
                assert code != "OK", f"a hostile {method} was accepted"

    fuzz()
    assert COUNT["requests"] >= 10_000
    assert calls["Stats"](pb.StatsRequest().SerializeToString(), timeout=10)  # still serving
    print(f"fuzz: {COUNT['requests']} requests, codes {dict(sorted(COUNT['codes'].items()))}")
    assert not math.isnan(good.pull(0, observer=True)["w"].sum().item())


STREAM_EXAMPLES = 250  # x (8 + 3) = 2,750 requests: half of the 8 through shared memory, then 2 with
# descriptors drawn anywhere and a hostile segment offer


def test_hostile_requests_on_the_stream_and_through_shared_memory_get_specific_codes_and_change_nothing(target):
    """The same hostile requests on the other paths: inline on a stream, and placed in a segment
    (ps.shm) with answer areas; and descriptors pointing anywhere, and hostile segment offers.
    Every answer is a specific code; no hostile push or offer is taken."""
    good, _ = target
    fp = good.plan.fingerprint
    seg = shm.Segment.create(4 << 20)
    frames: queue.Queue = queue.Queue()
    channel = grpc.insecure_channel(good.servers[0], options=[("grpc.max_send_message_length", 1 << 28)])
    answers = channel.stream_stream("/ps.ParameterServer/Stream")(iter(frames.get, None))
    counts = {"requests": 0, "shm": 0, "codes": {}}
    try:
        frames.put(wire.segment_offer(1, seg.name, seg.worker_nonce, "good"))
        assert wire.read_stream_answer(next(answers))[1] is None  # mapped
        rids = iter(range(2, 1 << 31))

        @settings(max_examples=STREAM_EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(st.lists(request(fp), min_size=BATCH, max_size=BATCH),
               st.lists(st.tuples(*[st.integers(0, 2**64 - 1)] * 4), min_size=2, max_size=2), st.binary(max_size=80))
        def fuzz(batch, descriptors, offer):
            frames_out = []  # (method, rid, frame, payload)
            for method, payload in batch:
                rid = next(rids)
                if rid % 2 == 0 and len(payload) <= 2 << 20:
                    seg.write(shm.HEADER, [payload])
                    frame = wire.stream_request(method, rid, None if payload else pb.StatsRequest(),
                                                shm=(shm.HEADER, len(payload), 3 << 20, 1 << 20))
                    counts["shm"] += 1
                else:
                    frame = wire.stream_request(method, rid, wire.Frame.of(payload))
                frames_out.append((method, rid, frame.tobytes(), payload))
            for desc, (method, _) in zip(descriptors, batch):  # anywhere, of any size
                rid = next(rids)
                frames_out.append((method, rid, wire.stream_request(method, rid, pb.StatsRequest(), shm=desc).tobytes(),
                                   b"descriptor %r" % (desc,)))
            rid = next(rids)  # a hostile offer (a second one on this stream, if it parses)
            frames_out.append(("Segment", rid, wire._REQ_HEAD.pack(wire.SEGMENT, rid) + offer, offer))
            for method, rid, frame, payload in frames_out:
                counts["requests"] += 1
                frames.put(frame)
                got, status, body = wire.read_stream_answer(next(answers))
                assert got == rid
                code = "OK" if status is None or status == wire.IN_SHM else status.name
                assert code in SPECIFIC | {"OK"}, f"{method}: {code} {bytes(body)[:200]!r} for {payload[:80]!r}"
                counts["codes"][code] = counts["codes"].get(code, 0) + 1
                if method in ("Push", "PushPull", "Segment"):
                    assert code != "OK", f"a hostile {method} was accepted on the stream"

        fuzz()
        assert counts["requests"] >= 2_700 and counts["shm"] >= 900
        frames.put(wire.stream_request("Stats", 1, pb.StatsRequest()).tobytes())
        _, status, body = wire.read_stream_answer(next(answers))
        assert status is None and pb.StatsResponse.FromString(bytes(body)).shm_segments == 1  # still serving
        print(f"stream fuzz: {counts['requests']} requests ({counts['shm']} in shared memory), codes "
              f"{dict(sorted(counts['codes'].items()))}")
    finally:
        frames.put(None)
        channel.close()
        seg.close()
