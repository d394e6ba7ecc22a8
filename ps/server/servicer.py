"""The gRPC adapter: decode a request, call the shard, encode the answer, map errors once."""

from __future__ import annotations

import functools
import logging
import math

import grpc

from ps import wire
from ps.errors import InvalidArgument, PlanMismatch, PSError
from ps.proto import ps_pb2 as pb
from ps.serde import optimizer_from_proto, plan_from_proto, stats_to_proto, tensor_from_proto
from ps.server.shard import Shard

log = logging.getLogger("ps.server")
ERROR_CLASS_KEY = "ps-error-class"


def _rpc(method):
    """Map PSError to its status code (class name in trailing metadata); anything else to INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            if isinstance(request, wire.Malformed):
                self.shard.reject(InvalidArgument(request.reason))
            return method(self, request, context)
        except PSError as e:
            context.set_trailing_metadata(((ERROR_CLASS_KEY, type(e).__name__),))
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except Exception as e:  # a bug: keep serving, say so
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper


class ParameterServerServicer:
    """Serves the ParameterServer service of ps.proto (registered through `wire.handler`)."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def _decode(self, tensors, lengths: list[int], writable: bool = True) -> list:
        """Decode a request's tensors for slices of these `lengths` (the shard's, or for an init
        the plan's). Counts and sparse sizes are checked before anything is expanded."""
        try:
            if len(tensors) > max(len(lengths), 1):
                raise InvalidArgument(f"a request carries {len(tensors)} tensors; this shard has {len(lengths)} slices")
            declared = sum(math.prod(t.shape) for t in tensors if len(t.indices))
            if declared > sum(lengths):
                raise InvalidArgument(f"sparse tensors declare {declared} elements; this shard's slices hold "
                                      f"{sum(lengths)}")
            limit = max(lengths, default=0)
            return [(t.key, tensor_from_proto(t, writable, limit)) for t in tensors]
        except InvalidArgument as e:
            self.shard.reject(e)

    @_rpc
    def Register(self, request, context):
        out = self.shard.register(request.worker_id, request.plan_fingerprint, request.clock, request.seen_version)
        cfg = self.shard.cfg
        return pb.RegisterResponse(
            **out, mode=cfg.mode, staleness=cfg.staleness, num_workers=cfg.num_workers,
            worker_timeout=cfg.worker_timeout, shard_id=cfg.shard_id, num_shards=cfg.num_shards,
            backup_workers=cfg.backup_workers,
        )

    @_rpc
    def Init(self, request, context):
        if request.plan.num_shards != self.shard.cfg.num_shards:  # before any work on the plan
            self.shard.reject(PlanMismatch(
                f"plan has {request.plan.num_shards} shards but this cluster has {self.shard.cfg.num_shards}"))
        try:
            plan = plan_from_proto(request.plan)
            optimizer = optimizer_from_proto(request.optimizer)
        except InvalidArgument as e:
            self.shard.reject(e)
        applied = self.shard.init(
            request.worker_id, plan, request.plan_fingerprint, optimizer,
            self._decode(request.tensors, [s.length for s in plan.slices_for(self.shard.cfg.shard_id)]),
            request.part, request.num_parts,
        )
        return pb.InitResponse(applied=applied)

    def _pull(self, worker_id: str, fingerprint: str, clock: int, keys: list[str], context) -> wire.Frame:
        def encode(slices, version: int, min_clock: int) -> wire.Frame:  # under the shard lock: one copy
            tensors = [wire.tensor_frame(key, "float32", [len(data) // 4], data) for key, data in slices]
            return wire.Frame.of(wire.pull_response_frame(version, min_clock, tensors).tobytes())

        return self.shard.pull(worker_id, fingerprint, clock, keys, context.is_active, encode)

    def _push(self, request: wire.PushIn) -> pb.PushResponse:
        h = request.header
        result = self.shard.push(
            h.worker_id, h.plan_fingerprint, h.clock, h.base_version,
            self._decode(request.grads, self.shard.store.slice_lengths, writable=False), h.part, h.num_parts,
            sum(t.data.nbytes + t.indices.nbytes for t in request.grads),
        )
        return pb.PushResponse(
            outcome=pb.PushResponse.Outcome.Value(result.outcome), version=result.version, staleness=result.staleness
        )

    @_rpc
    def Pull(self, request, context):
        return self._pull(request.worker_id, request.plan_fingerprint, request.clock, list(request.keys), context)

    @_rpc
    def Push(self, request, context):
        return self._push(request)

    @_rpc
    def PushPull(self, request, context):
        push = request.push.header
        if push.num_parts != 1:
            self.shard.reject(InvalidArgument(f"PushPull takes a whole push (num_parts 1), not {push.num_parts} parts"))
        pushed = self._push(request.push)
        return wire.push_pull_response_frame(
            pushed, self._pull(push.worker_id, push.plan_fingerprint, push.clock + 1, request.pull_keys, context))

    @_rpc
    def Heartbeat(self, request, context):
        self.shard.heartbeat(request.worker_id)
        return pb.Ack()

    @_rpc
    def Leave(self, request, context):
        self.shard.leave(request.worker_id)
        return pb.Ack()

    @_rpc
    def Stats(self, request, context):
        return stats_to_proto(self.shard.stats())
