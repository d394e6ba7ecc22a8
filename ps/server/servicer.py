"""The gRPC adapter (grpc.aio): decode a request, call the shard, encode the answer, map errors once.

No request holds a thread while it waits: a pull that must wait (sync, ssp) awaits a future the
shard resolves when its state moves. Tensor work (decoding, validation, the optimizer, pull
encoding) runs on the event loop for small shards, where a thread hop would cost more than the
work, and on a thread pool for large ones (torch releases the GIL in its kernels).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from concurrent.futures import Executor

import grpc

from ps import wire
from ps.errors import InvalidArgument, Overloaded, PlanMismatch, PSError
from ps.proto import ps_pb2 as pb
from ps.serde import optimizer_from_proto, plan_from_proto, stats_to_proto, tensor_from_proto
from ps.server.shard import Shard

log = logging.getLogger("ps.server")
ERROR_CLASS_KEY = "ps-error-class"
INLINE_ELEMENTS = 1 << 18  # shards (or requests) up to this many fp32 elements are served on the loop
ADMISSION_WAIT = 2.0  # seconds a request waits for room before it is refused RESOURCE_EXHAUSTED


def _rpc(method):
    """Map PSError to its status code (class name in trailing metadata); anything else to INTERNAL."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await self._serve(method, request, context)
        except PSError as e:
            context.set_trailing_metadata(((ERROR_CLASS_KEY, type(e).__name__),))
            await context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except Exception as e:  # a bug: keep serving, say so
            log.exception("internal error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    return wrapper


class Admission:
    """A bound on the bytes of requests a shard processes at once. A request that does not fit waits up to `wait` seconds for room, then is refused
    with `Overloaded` (RESOURCE_EXHAUSTED; clients retry with backoff). A request alone is always
    let in. Used from the event loop only."""

    def __init__(self, shard: Shard, limit: int, wait: float = ADMISSION_WAIT):
        self.shard, self.limit, self.wait, self.used = shard, limit, wait, 0
        self._room: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int):
        if nbytes <= 0:
            yield
            return
        await self._enter(nbytes)
        try:
            yield
        finally:
            self.used -= nbytes
            async with self._room:
                self._room.notify_all()

    def _full(self, nbytes: int) -> bool:
        # Half-assembled pushes are not counted here: refusing the parts that would complete
        # them would only keep them longer. They are bounded apart (one per worker, each key in
        # it once, dropped a lease after their worker goes).
        return self.used > 0 and self.used + nbytes > self.limit

    async def _enter(self, nbytes: int) -> None:
        if self._room is None:
            self._room = asyncio.Condition()
        if self._full(nbytes):
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.wait
            async with self._room:
                while self._full(nbytes):
                    left = deadline - loop.time()
                    if left <= 0:
                        self.shard.count("overloaded")
                        raise Overloaded(
                            f"shard {self.shard.cfg.shard_id} is busy: {self.used} bytes "
                            f"in flight, a request of {nbytes} more would pass max_inflight_bytes ({self.limit}); "
                            "retry later")
                    with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError itself from 3.11 on
                        await asyncio.wait_for(self._room.wait(), left)
        self.used += nbytes


def _payload_bytes(tensors) -> int:
    return sum(t.data.nbytes + t.indices.nbytes for t in tensors)


def _encode_pull(slices, version: int, min_clock: int) -> wire.Frame:
    """A PullResponse from read-only views of the live slices (called with their locks held: one copy)."""
    tensors = [wire.tensor_frame(key, "float32", [len(data) // 4], data) for key, data in slices]
    return wire.Frame.of(wire.pull_response_frame(version, min_clock, tensors).tobytes())


class ParameterServerServicer:
    """Serves the ParameterServer service of ps.proto (registered through `wire.handler`)."""

    def __init__(self, shard: Shard, pool: Executor, max_inflight_bytes: int):
        self.shard, self.pool = shard, pool
        self.admission = Admission(shard, max_inflight_bytes)
        self._streams: set[asyncio.Queue] = set()  # the answer queues of open streams
        self._loop: asyncio.AbstractEventLoop | None = None
        shard.on_stop(self._end_streams)

    def _end_streams(self) -> None:
        """The server stops: end every open stream (its client sees it end, and retries elsewhere or
        after the restart), so a stop does not wait out its grace period for idle streams."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: [q.put_nowait(None) for q in list(self._streams)])

    async def _serve(self, method, request, context):
        if isinstance(request, wire.Malformed):
            self.shard.reject(InvalidArgument(request.reason))
        return await method(self, request, context)

    async def Stream(self, requests, context):
        """Every method on one bidirectional stream of raw bytes (see `ps.wire`, the stream path):
        requests are served concurrently, each as its unary method would be, and answered by id
        as they complete. A malformed frame is answered INVALID_ARGUMENT (by id when it has one)
        and changes nothing; the stream itself goes on."""
        answers: asyncio.Queue = asyncio.Queue()
        tasks: dict[int, asyncio.Task] = {}
        self._loop = asyncio.get_running_loop()
        if self.shard.stopped:
            return
        self._streams.add(answers)

        async def serve(rid: int, name: str, body: memoryview) -> None:
            try:
                request = wire.read_body(wire.request_reader(name), body)
                answer = wire.stream_answer(rid, await self._serve(getattr(type(self), name).__wrapped__, request,
                                                                   context))
            except PSError as e:
                answer = wire.stream_error(rid, getattr(grpc.StatusCode, e.code), type(e).__name__, str(e))
            except asyncio.CancelledError:
                return
            except Exception as e:  # a bug: keep serving, say so
                log.exception("internal error in %s (stream)", name)
                answer = wire.stream_error(rid, grpc.StatusCode.INTERNAL, "", f"{type(e).__name__}: {e}")
            finally:
                tasks.pop(rid, None)
            answers.put_nowait(answer)

        async def read() -> None:
            try:
                async for data in requests:
                    try:
                        code, rid, body = wire.read_stream_request(data)
                    except ValueError as e:
                        with contextlib.suppress(PSError):
                            self.shard.reject(InvalidArgument(str(e)))
                        rid = int.from_bytes(bytes(data[1:5]), "little") if len(data) >= 5 else 0
                        answers.put_nowait(wire.stream_error(rid, grpc.StatusCode.INVALID_ARGUMENT,
                                                             InvalidArgument.__name__, str(e)))
                        continue
                    if code == wire.CANCEL:
                        task = tasks.pop(rid, None)
                        if task is not None:
                            task.cancel()
                    elif rid in tasks:
                        answers.put_nowait(wire.stream_error(rid, grpc.StatusCode.INVALID_ARGUMENT,
                                                             InvalidArgument.__name__,
                                                             f"stream request id {rid} is already in use"))
                    else:
                        tasks[rid] = asyncio.ensure_future(serve(rid, wire.STREAM_NAMES[code], body))
                if tasks:  # the client is done sending: answer what it asked, then end
                    await asyncio.gather(*tasks.values(), return_exceptions=True)
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            self._streams.discard(answers)
            reader.cancel()
            for task in list(tasks.values()):
                task.cancel()

    async def _run(self, elements: int, fn, *args):
        """fn(*args) on the loop when the shard and the request are small, else on the pool."""
        if max(elements, self.shard.store.elements) <= INLINE_ELEMENTS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

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

    async def _until(self, ask):
        """Await `ask(wake)`: it answers (not None) or registers `wake`, which the shard calls
        (once, from any thread) when its state moves; then ask again. No thread is held."""
        loop = asyncio.get_running_loop()
        while True:
            ready = loop.create_future()

            def wake(ready=ready) -> None:
                loop.call_soon_threadsafe(lambda: ready.done() or ready.set_result(None))

            answer = ask(wake)
            if answer is not None:
                return answer
            try:
                await ready
            except asyncio.CancelledError:  # the client went away or its deadline passed
                self.shard.forget(wake)
                raise

    async def _wait(self, worker_id: str, clock: int) -> None:
        """Until a worker at `clock` may read."""
        await self._until(lambda wake: self.shard.ready_or_wait(worker_id, clock, wake) or None)

    async def _pull(self, worker_id: str, fingerprint: str, clock: int, keys: list[str]) -> wire.Frame:
        self.shard.check_pull(worker_id, fingerprint, clock, keys)
        await self._wait(worker_id, clock)
        nbytes = 4 * sum(self.shard.store.params[k].numel() for k in keys)
        async with self.admission.hold(nbytes):
            return await self._run(nbytes // 4, self.shard.read, keys, _encode_pull)

    def _push_now(self, request: wire.PushIn):
        h = request.header
        return self.shard.push(
            h.worker_id, h.plan_fingerprint, h.clock, h.base_version,
            self._decode(request.grads, self.shard.store.slice_lengths, writable=False), h.part, h.num_parts,
            _payload_bytes(request.grads), no_grad=h.no_grad, member=h.member, members=h.members,
        )

    async def _push(self, request: wire.PushIn) -> pb.PushResponse:
        nbytes = _payload_bytes(request.grads)
        async with self.admission.hold(nbytes):
            result = await self._run(nbytes // 4, self._push_now, request)
        if result.wait:  # a group member's last part: answer the push's outcome, once decided
            h = request.header
            result = await self._until(lambda wake: self.shard.push_outcome_or_wait(h.worker_id, h.clock, wake))
        return pb.PushResponse(
            outcome=pb.PushResponse.Outcome.Value(result.outcome), version=result.version, staleness=result.staleness
        )

    @_rpc
    async def Register(self, request, context):
        out = await self._run(0, self.shard.register, request.worker_id, request.plan_fingerprint, request.clock,
                              request.seen_version)
        cfg = self.shard.cfg
        return pb.RegisterResponse(
            **out, mode=cfg.mode, staleness=cfg.staleness, num_workers=cfg.num_workers,
            worker_timeout=cfg.worker_timeout, shard_id=cfg.shard_id, num_shards=cfg.num_shards,
            backup_workers=cfg.backup_workers, transports=["unary", "stream"],
        )

    def _init_now(self, request) -> bool:
        if request.plan.num_shards != self.shard.cfg.num_shards:  # before any work on the plan
            self.shard.reject(PlanMismatch(
                f"plan has {request.plan.num_shards} shards but this cluster has {self.shard.cfg.num_shards}"))
        try:
            plan = plan_from_proto(request.plan)
            optimizer = optimizer_from_proto(request.optimizer)
        except InvalidArgument as e:
            self.shard.reject(e)
        return self.shard.init(
            request.worker_id, plan, request.plan_fingerprint, optimizer,
            self._decode(request.tensors, [s.length for s in plan.slices_for(self.shard.cfg.shard_id)], writable=False),
            request.part, request.num_parts, request.version,
        )

    @_rpc
    async def Init(self, request, context):
        nbytes = sum(len(t.data) + len(t.indices) for t in request.tensors)
        async with self.admission.hold(nbytes):
            return pb.InitResponse(applied=await self._run(nbytes // 4, self._init_now, request))

    @_rpc
    async def Pull(self, request, context):
        return await self._pull(request.worker_id, request.plan_fingerprint, request.clock, list(request.keys))

    @_rpc
    async def Push(self, request, context):
        return await self._push(request)

    @_rpc
    async def PushPull(self, request, context):
        push = request.push.header
        if push.num_parts != 1:
            self.shard.reject(InvalidArgument(f"PushPull takes a whole push (num_parts 1), not {push.num_parts} parts"))
        # The whole request is checked before its push changes anything.
        self.shard.check_pull(push.worker_id, push.plan_fingerprint, push.clock + 1, request.pull_keys)
        pushed = await self._push(request.push)
        if pushed.outcome == pb.PushResponse.EVICTED:  # the worker must register again and pull fresh weights
            return wire.push_pull_response_frame(pushed, wire.pull_response_frame(pushed.version, 0, []))
        return wire.push_pull_response_frame(
            pushed, await self._pull(push.worker_id, push.plan_fingerprint, push.clock + 1, request.pull_keys))

    @_rpc
    async def Heartbeat(self, request, context):
        self.shard.heartbeat(request.worker_id)
        return pb.Ack()

    @_rpc
    async def Leave(self, request, context):
        await self._run(0, self.shard.leave, request.worker_id)
        return pb.Ack()

    @_rpc
    async def Stats(self, request, context):
        return stats_to_proto(self.shard.stats())
