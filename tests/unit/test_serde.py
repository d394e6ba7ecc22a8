import pytest
import torch

from ps.config import OptimizerConfig
from ps.errors import InvalidArgument
from ps.proto import ps_pb2 as pb
from ps import wire
from ps.serde import (sparse_frame, optimizer_from_proto, optimizer_to_proto, plan_from_proto, plan_to_proto, stats_from_proto, tensor_into,
                      stats_to_proto, tensor_from_proto, tensor_to_proto)
from ps.sharding import ParamSpec, make_plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4, 2)])
def test_tensor_round_trip_is_bit_exact(dtype, shape):
    t = torch.randn(shape).to(dtype)
    back = tensor_from_proto(pb.Tensor.FromString(tensor_to_proto("k", t).SerializeToString()))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)


def test_non_contiguous_tensors_travel_in_c_order():
    t = torch.arange(12.0).reshape(3, 4).t()
    assert torch.equal(tensor_from_proto(tensor_to_proto("k", t)), t)


def test_decoded_tensor_is_writable_and_independent_of_the_message():
    msg = tensor_to_proto("k", torch.ones(4))
    t = tensor_from_proto(msg)
    t.add_(1)
    assert torch.equal(tensor_from_proto(msg), torch.ones(4))


@pytest.mark.parametrize("mutate, rule", [
    (lambda m: setattr(m, "data", m.data[:-1]), "bytes"),
    (lambda m: setattr(m, "dtype", "int64"), "dtype"),
    (lambda m: m.shape.__setitem__(0, -1), "non-negative"),
    (lambda m: m.shape.extend([1] * 9), "at most"),
])
def test_malformed_tensors_are_refused_with_the_rule(mutate, rule):
    msg = tensor_to_proto("k", torch.ones(4))
    mutate(msg)
    with pytest.raises(InvalidArgument, match=rule):
        tensor_from_proto(msg)


def test_plan_round_trip_keeps_the_fingerprint():
    plan = make_plan([ParamSpec("w", (300, 300)), ParamSpec("b", (3,), "bfloat16")], 2, 65536)
    assert plan_from_proto(plan_to_proto(plan)).fingerprint == plan.fingerprint


def test_optimizer_round_trip():
    cfg = OptimizerConfig("adam", lr=1e-3, weight_decay=0.01, beta2=0.99)
    assert optimizer_from_proto(optimizer_to_proto(cfg)) == cfg


def test_optimizer_from_wire_is_validated():
    with pytest.raises(InvalidArgument, match="lr"):
        optimizer_from_proto(pb.OptimizerSpec(name="sgd", lr=-1))


def test_stats_round_trip():
    stats = {"shard_id": 1, "mode": "ssp", "version": 7, "clocks": {"a": 3}, "staleness_histogram": {0: 2, 3: 1},
             "active_workers": 1, "pushes": 7, "pulls": 9, "rejected": 1, "evictions": 0, "dropped": 0,
             "duplicates": 2, "initialized": True, "num_keys": 4, "num_elements": 100, "bytes_pushed": 800,
             "bytes_pulled": 1600, "backup_workers": 0, "lost_updates": 3, "checkpoints": 5,
             "stalled_evictions": 1, "refused_evicted": 2, "overloaded": 4, "reinitialized": 1,
             "shm_segments": 1, "shm_bytes": 4096, "shm_published": 2, "shm_lent_bytes": 1024,
             "table_mode": "async", "table_version": 12,
             "tables": {"t": {"rows": 5, "version": 12, "pending": 1, "created": 6, "evicted_idle": 1, "evicted_lru": 0,
                              "admission_dropped": 2, "rows_pulled": 30, "rows_pushed": 20,
                              "pending_forgotten": 0}}}
    assert stats_from_proto(stats_to_proto(stats)) == stats


def test_decoding_into_a_slice_of_a_bigger_tensor_writes_only_that_slice():
    out = torch.zeros(10)
    tensor_into(tensor_to_proto("k", torch.arange(4.0)), out[3:7])
    assert out.tolist() == [0, 0, 0, 0, 1, 2, 3, 0, 0, 0]


@pytest.mark.parametrize("msg", [
    pb.Tensor(key="k", dtype="float16", shape=[4], data=b"\0" * 8),
    pb.Tensor(key="k", dtype="float32", shape=[5], data=b"\0" * 20),
    pb.Tensor(key="k", dtype="float32", shape=[4], data=b"\0" * 15),
])
def test_decoding_into_a_tensor_that_does_not_fit_is_refused(msg):
    out = torch.zeros(4)
    with pytest.raises(InvalidArgument, match="does not fit"):
        tensor_into(msg, out)
    assert torch.equal(out, torch.zeros(4))


def _sparse(indices, values, shape=(6,)):
    frame = wire.push_frame(pb.PushRequest(), [sparse_frame("k", list(shape), torch.tensor(indices), torch.tensor(values))])
    return pb.PushRequest.FromString(frame.tobytes()).grads[0]  # parsed by protobuf itself


def test_a_sparse_tensor_decodes_dense_and_repeated_positions_add_up():
    back = tensor_from_proto(_sparse([4, 0, 4], [1.0, 2.0, 3.0], (2, 3)))
    assert torch.equal(back, torch.tensor([[2.0, 0, 0], [0, 4.0, 0]]))


@pytest.mark.parametrize("mutate, rule", [
    (lambda m: setattr(m, "indices", m.indices[:-1]), "multiple of 4"),
    (lambda m: setattr(m, "data", m.data[:-4]), "one value per position"),
    (lambda m: setattr(m, "indices", torch.tensor([0, 6], dtype=torch.int32).numpy().tobytes()), r"\[0, 6\)"),
    (lambda m: setattr(m, "indices", torch.tensor([-1, 2], dtype=torch.int32).numpy().tobytes()), r"\[0, 6\)"),
    (lambda m: (setattr(m, "indices", torch.zeros(7, dtype=torch.int32).numpy().tobytes()),
                setattr(m, "data", torch.zeros(7).numpy().tobytes())), "at most 6 positions"),
])
def test_malformed_sparse_tensors_are_refused_with_the_rule(mutate, rule):
    msg = _sparse([1, 2], [1.0, 2.0])
    mutate(msg)
    with pytest.raises(InvalidArgument, match=rule):
        tensor_from_proto(msg)
