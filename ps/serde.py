"""Tensors and specs to and from wire messages: paired `x_to_proto` / `x_from_proto`.

Tensor bytes are raw, little-endian, C order; decoding checks dtype, shape and byte length
before it builds anything, so a malformed message never reaches the store.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings

import numpy as np
import torch

from ps.config import OptimizerConfig
from ps import buffers, wire
from ps.errors import InvalidArgument
from ps.proto import ps_pb2 as pb
from ps.tables import TableSpec
from ps.sharding import DTYPE_NAMES, DTYPES, ParamSpec, Plan, dtype_name, make_plan

# Read-only views of received bytes are safe here: decoded gradients are only ever read.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("ps's wire format is little-endian; this host is big-endian")

_MAX_DIMS = 8


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach()
    return (t.cpu() if t.device.type != "cpu" else t).contiguous()


def _raw_view(t: torch.Tensor):
    """The bytes of a contiguous CPU tensor as a buffer (no copy; any dtype, bf16 included)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _wire_bytes(tensor: torch.Tensor) -> tuple[str, list[int], bytes]:
    t = _cpu(tensor)
    return dtype_name(t.dtype), list(t.shape), _raw_view(t).tobytes() if t.numel() else b""


def dense_frame(key: str, tensor: torch.Tensor) -> wire.Frame:
    """A Tensor message referring to `tensor`'s memory, copied when the message is sent."""
    t = _cpu(tensor)
    return wire.tensor_frame(key, dtype_name(t.dtype), t.shape, _raw_view(t) if t.numel() else b"")


def sparse_frame(key: str, shape: list[int], indices: torch.Tensor, values: torch.Tensor) -> wire.Frame:
    """A sparse gradient: int32 `indices` into the flattened dense `shape`, and their `values`."""
    v = _cpu(values)
    return wire.tensor_frame(key, dtype_name(v.dtype), shape, _raw_view(v), _raw_view(_cpu(indices).to(torch.int32)))


def tensor_to_proto(key: str, tensor: torch.Tensor) -> pb.Tensor:
    """Encode a CPU tensor (copied once, into the message's bytes)."""
    dtype, shape, data = _wire_bytes(tensor)
    return pb.Tensor(key=key, dtype=dtype, shape=shape, data=data)


def _densify(msg: pb.Tensor, shape: tuple[int, ...], dtype: torch.dtype, numel: int,
             max_numel: int | None) -> torch.Tensor:
    """The dense tensor of a sparse message, after checking every position (and, before
    allocating it, its size: a hostile shape must not make the server allocate terabytes)."""
    if max_numel is not None and numel > max_numel:
        raise InvalidArgument(f"tensor {msg.key!r}: sparse shape {list(shape)} has {numel} elements, more than "
                              f"the largest slice here ({max_numel})")
    if len(msg.indices) % 4:
        raise InvalidArgument(f"tensor {msg.key!r}: indices take {len(msg.indices)} bytes, not a multiple of 4 (int32)")
    n = len(msg.indices) // 4
    if n > numel or len(msg.data) != n * dtype.itemsize:
        raise InvalidArgument(
            f"tensor {msg.key!r}: {n} positions with {len(msg.data)} bytes of {msg.dtype} values; needs one "
            f"value per position and at most {numel} positions (shape {list(shape)})")
    idx = torch.frombuffer(msg.indices, dtype=torch.int32).long()
    if n and (int(idx.min()) < 0 or int(idx.max()) >= numel):
        raise InvalidArgument(f"tensor {msg.key!r}: positions must be in [0, {numel}), got "
                              f"[{int(idx.min())}, {int(idx.max())}]")
    dense = torch.zeros(numel, dtype=dtype)
    if n:
        dense.index_add_(0, idx, torch.frombuffer(msg.data, dtype=dtype))
    return dense.reshape(shape)


def tensor_into(msg: pb.Tensor, out: torch.Tensor) -> None:
    """Decode straight into `out` (contiguous; its dtype and number of elements must match): one
    copy from the message's bytes, no intermediate tensor."""
    want = DTYPE_NAMES.get(out.dtype)
    if msg.dtype != want or math.prod(msg.shape) != out.numel() or len(msg.data) != out.numel() * out.element_size():
        raise InvalidArgument(
            f"tensor {msg.key!r}: {msg.dtype} {list(msg.shape)} in {len(msg.data)} bytes does not fit "
            f"{want} of {out.numel()} elements")
    if out.numel():
        buffers.copy_bytes(out.view(torch.uint8).numpy(), msg.data)


def tensor_from_proto(msg: pb.Tensor, writable: bool = True, max_numel: int | None = None) -> torch.Tensor:
    """Decode into a CPU tensor; raises InvalidArgument on any inconsistency. writable=False
    returns a read-only view of the message's bytes (no copy): the caller must not write to it.
    max_numel bounds what a sparse tensor may expand to."""
    if msg.dtype not in DTYPES:
        raise InvalidArgument(f"tensor {msg.key!r}: dtype ({msg.dtype!r}) must be one of {sorted(DTYPES)}")
    shape = tuple(msg.shape)
    if len(shape) > _MAX_DIMS or any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor {msg.key!r}: shape {list(shape)} must have at most {_MAX_DIMS} non-negative dims")
    dtype = DTYPES[msg.dtype]
    if msg.indices:
        return _densify(msg, shape, dtype, math.prod(shape), max_numel)
    expected = math.prod(shape) * dtype.itemsize
    if len(msg.data) != expected:
        raise InvalidArgument(
            f"tensor {msg.key!r}: {len(msg.data)} bytes, but shape {list(shape)} of {msg.dtype} needs {expected}"
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    if not writable:  # a view of the message's bytes: no copy; the caller only reads it
        return torch.frombuffer(msg.data, dtype=dtype).reshape(shape)
    return torch.frombuffer(bytearray(msg.data), dtype=dtype).reshape(shape)


def plan_to_proto(plan: Plan) -> pb.PlanSpec:
    return pb.PlanSpec(
        params=[pb.ParamSpec(name=p.name, dtype=p.dtype, shape=list(p.shape)) for p in plan.params],
        num_shards=plan.num_shards,
        partition_bytes=plan.partition_bytes,
    )


def plan_from_proto(msg: pb.PlanSpec) -> Plan:
    params = [ParamSpec(p.name, tuple(p.shape), p.dtype) for p in msg.params]
    return make_plan(params, msg.num_shards, msg.partition_bytes)


def optimizer_to_proto(cfg: OptimizerConfig) -> pb.OptimizerSpec:
    return pb.OptimizerSpec(**dataclasses.asdict(cfg))


def optimizer_from_proto(msg: pb.OptimizerSpec) -> OptimizerConfig:
    return OptimizerConfig(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(OptimizerConfig)})


def stats_to_proto(stats: dict) -> pb.StatsResponse:
    tables = {name: pb.TableStats(**t) for name, t in stats.get("tables", {}).items()}
    return pb.StatsResponse(**{**stats, "tables": tables})


def stats_from_proto(msg: pb.StatsResponse) -> dict:
    out = {f.name: getattr(msg, f.name) for f in pb.StatsResponse.DESCRIPTOR.fields}
    out["clocks"] = dict(msg.clocks)
    out["staleness_histogram"] = dict(msg.staleness_histogram)
    out["tables"] = {name: {f.name: getattr(t, f.name) for f in pb.TableStats.DESCRIPTOR.fields}
                     for name, t in msg.tables.items()}
    return out


def table_spec_to_proto(spec: TableSpec) -> pb.TableSpec:
    return pb.TableSpec(**dataclasses.asdict(spec))


def table_spec_from_proto(msg: pb.TableSpec) -> TableSpec:
    """InvalidArgument (naming the field and the rule) for a spec out of range."""
    return TableSpec(**{f.name: getattr(msg, f.name) for f in dataclasses.fields(TableSpec)})


def rows_to_proto(table: str, ids: np.ndarray, values: torch.Tensor | None = None) -> pb.Rows:
    """One table's ids (int64) and, for a push, their gradients (float32 [len(ids), dim])."""
    data = b"" if values is None else values.detach().to(torch.float32).contiguous().numpy().tobytes()
    return pb.Rows(table=table, ids=np.ascontiguousarray(ids, dtype="<i8").tobytes(), values=data)


def ids_from_proto(msg: pb.Rows) -> np.ndarray:
    """The ids of a Rows message; InvalidArgument for another dtype or a ragged byte length."""
    if msg.ids_dtype not in ("", "int64"):
        raise InvalidArgument(f"table {msg.table!r}: ids must be int64, not {msg.ids_dtype!r}")
    if len(msg.ids) % 8:
        raise InvalidArgument(f"table {msg.table!r}: ids take {len(msg.ids)} bytes, not a multiple of 8 (int64)")
    return np.frombuffer(msg.ids, dtype="<i8").astype(np.int64, copy=False)


def values_from_proto(msg: pb.Rows, rows: int, dim: int) -> torch.Tensor:
    """A Rows message's float32 values as [rows, dim]; InvalidArgument naming the mismatch."""
    if msg.dtype not in ("", "float32"):
        raise InvalidArgument(f"table {msg.table!r}: values must be float32, not {msg.dtype!r}")
    if len(msg.values) != rows * dim * 4:
        got = len(msg.values) / (dim * 4)
        raise InvalidArgument(f"table {msg.table!r}: {len(msg.values)} bytes of values are "
                              f"{got:g} rows of dim {dim}, but {rows} ids were sent (one row per id)")
    if not rows:
        return torch.empty(0, dim)
    with warnings.catch_warnings():  # read-only: the caller copies the values or only reads them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(msg.values, dtype=torch.float32).view(rows, dim)
