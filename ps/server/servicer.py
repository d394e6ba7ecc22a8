"""The gRPC adapter: decode a request, call the shard, encode the answer, map errors once."""

from __future__ import annotations

import functools
import logging

import grpc

from ps.errors import InvalidArgument, PlanMismatch, PSError
from ps.proto import ps_pb2 as pb
from ps.proto import ps_pb2_grpc
from ps.serde import add_raw, optimizer_from_proto, plan_from_proto, stats_to_proto, tensor_from_proto
from ps.server.shard import Shard

log = logging.getLogger("ps.server")
ERROR_CLASS_KEY = "ps-error-class"


def _rpc(method):
    """Map PSError to its status code (class name in trailing metadata); anything else to INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except PSError as e:
            context.set_trailing_metadata(((ERROR_CLASS_KEY, type(e).__name__),))
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except Exception as e:  # a bug: keep serving, say so
            log.exception("internal error in %s", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper


class ParameterServerServicer(ps_pb2_grpc.ParameterServerServicer):
    def __init__(self, shard: Shard):
        self.shard = shard

    def _decode(self, tensors, writable: bool = True) -> list:
        try:
            return [(t.key, tensor_from_proto(t, writable)) for t in tensors]
        except InvalidArgument as e:
            self.shard.reject(e)

    @_rpc
    def Register(self, request, context):
        out = self.shard.register(request.worker_id, request.plan_fingerprint, request.clock)
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
            self._decode(request.tensors), request.part, request.num_parts,
        )
        return pb.InitResponse(applied=applied)

    def _pull(self, worker_id: str, fingerprint: str, clock: int, keys: list[str], context,
              response: pb.PullResponse) -> pb.PullResponse:
        slices, response.version, response.min_clock = self.shard.pull(worker_id, fingerprint, clock, keys,
                                                                       context.is_active)
        for key, data in slices:  # built in place: adding finished messages would copy them
            add_raw(response.tensors, key, "float32", [len(data) // 4], data)
        return response

    def _push(self, request: pb.PushRequest) -> pb.PushResponse:
        result = self.shard.push(
            request.worker_id, request.plan_fingerprint, request.clock, request.base_version,
            self._decode(request.grads, writable=False), request.part, request.num_parts,
        )
        return pb.PushResponse(
            outcome=pb.PushResponse.Outcome.Value(result.outcome), version=result.version, staleness=result.staleness
        )

    @_rpc
    def Pull(self, request, context):
        return self._pull(request.worker_id, request.plan_fingerprint, request.clock, list(request.keys), context,
                          pb.PullResponse())

    @_rpc
    def Push(self, request, context):
        return self._push(request)

    @_rpc
    def PushPull(self, request, context):
        push = request.push
        if push.num_parts != 1:
            self.shard.reject(InvalidArgument(f"PushPull takes a whole push (num_parts 1), not {push.num_parts} parts"))
        response = pb.PushPullResponse(push=self._push(push))
        self._pull(push.worker_id, push.plan_fingerprint, push.clock + 1, list(request.pull_keys), context,
                   response.pull)
        return response

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
