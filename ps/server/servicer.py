"""The gRPC adapter (grpc.aio): decode a request, call the shard, encode the answer, map errors once.

No request holds a thread while it waits: a pull that must wait (sync, ssp) awaits a future the
shard resolves when its state moves. Tensor work (decoding, validation, the optimizer, pull
encoding) runs on the event loop for small shards, where a thread hop would cost more than the
work, and on a thread pool for large ones (torch releases the GIL in its kernels).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import itertools
import logging
import math
import secrets
from concurrent.futures import Executor, ThreadPoolExecutor

import grpc

import numpy as np

from ps import buffers, link, shm, wire
from ps.errors import (InvalidArgument, Overloaded, PlanMismatch, PSError, ResourceExhausted, ShmUnavailable,
                       Unavailable, UnknownTable)
from ps.proto import ps_pb2 as pb
from ps.serde import (ids_from_proto, optimizer_from_proto, plan_from_proto, stats_to_proto, table_spec_from_proto,
                      tensor_from_proto, values_from_proto)
from ps.server.shard import Shard
from ps.server.table import RowsIn

log = logging.getLogger("ps.server")
ERROR_CLASS_KEY = "ps-error-class"
INLINE_ELEMENTS = 1 << 18  # shards (or requests) up to this many fp32 elements are served on the loop
TABLE_THREADS = 4  # threads for embedding-table calls (their own: see _tabled)
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


# A Pull served on a stream with a segment: (segment, offset, capacity) of the area its answer
# may be written into; on a plain socket that takes split answers, the pool to put its bytes in
# (the task serving it sets it; `_pull` encodes straight into it).
_ANSWER_AREA: contextvars.ContextVar = contextvars.ContextVar("ps_answer_area", default=None)


@dataclasses.dataclass(frozen=True)
class _InArea:
    """An answer written into the request's answer area (its size)."""

    nbytes: int


@dataclasses.dataclass(frozen=True)
class _Split:
    """An answer to send as a split frame: the PullResponse without payloads, then the payloads."""

    meta: bytes
    payload: list


@dataclasses.dataclass(frozen=True)
class _Published:
    """A Pull through shared memory that may be answered by reference (ps.shm.Arena); else into
    `fallback`, its answer area."""

    arena: shm.Arena
    fallback: tuple


@dataclasses.dataclass(frozen=True)
class _Ref:
    """An answer by reference: the PullResponse without payloads, per tensor (chunk, offset), and
    the views of the slices (held, so that they copy on write, until the worker releases them)."""

    meta: bytes
    located: list
    views: list


def _head(slices, version: int, min_clock: int) -> bytes:
    """A PullResponse for these slices without their bytes (an answer's head: keys and shapes)."""
    return pb.PullResponse(version=version, min_clock=min_clock, tensors=[
        pb.Tensor(key=key, dtype="float32", shape=[len(data) // 4]) for key, data in slices]).SerializeToString()


def _encode_pull(slices, version: int, min_clock: int, keep: bool = False, area=None):
    """A PullResponse from read-only views of the live slices (called with their locks held: one
    copy, into the answer area when there is one it fits in, or into a pooled buffer sent as a
    split answer's tail; none for a split answer when `keep` (the views may be kept: the slices
    copy on write), the views themselves are sent). A split answer whose head (keys and shapes)
    would be over ps.link's limit goes whole."""
    if isinstance(area, _Published):
        located = [area.arena.locate(data) for _, data in slices] if keep else []
        anchor = next((at for at in located if at is not None), None)
        if anchor is not None and all(at is not None or not len(data) for at, (_, data) in zip(located, slices)):
            # An empty slice lies nowhere: named in a chunk the answer keeps anyway.
            located = [at if at is not None else (anchor[0], shm.HEADER) for at in located]
            return _Ref(_head(slices, version, min_clock), located, [data for _, data in slices])
        area = area.fallback  # (slices not in the arena: the store was built before it, or it ran out)
    meta = _head(slices, version, min_clock) if isinstance(area, buffers.Pool) else None
    if meta is not None and len(meta) + wire.ANSWER_HEAD <= link.MAX_HEAD:
        if keep:
            return _Split(meta, [data for _, data in slices])
        payload = area.take(sum(len(data) for _, data in slices))
        out, pos = np.frombuffer(payload, np.uint8), 0
        for _, data in slices:
            out[pos:pos + len(data)] = np.frombuffer(data, np.uint8)
            pos += len(data)
        return _Split(meta, [payload])
    tensors = [wire.tensor_frame(key, "float32", [len(data) // 4], data) for key, data in slices]
    frame = wire.pull_response_frame(version, min_clock, tensors)
    if isinstance(area, tuple) and frame.size <= area[2]:  # (segment, offset, capacity)
        area[0].write(area[1], frame.chunks)
        return _InArea(frame.size)
    return wire.Frame.of(frame.tobytes())


LENT_GRACE = 10.0  # seconds slices answered by reference stay held after their stream ended

# Pushes in shared memory are checked and applied from the worker's segment itself, no copy:
# the worker writes nothing into a request's area until its answer has come (ps.shm), and a
# push that is answered has been applied, accumulated or refused, its bytes no longer read.
# A push whose parts the shard holds past the answer (one of several parts, or a tensor-parallel
# member's) is copied out first. (A process that writes into an area it handed over could change
# its gradient between the check and the step; it is of the server's user on the server's host,
# which shared memory does not keep apart from the server anyway: ps.shm.)
_APPLIED_IN_PLACE = frozenset({"Push", "PushPull"})


def _held_past_answer(request) -> bool:
    push = request.push if isinstance(request, wire.PushPullIn) else request
    if not isinstance(push, wire.PushIn):  # malformed: refused without being held
        return False
    return push.header.num_parts > 1 or push.header.members > 1


class _Stream:
    """One open Stream call: its answer queue, and the shared-memory segment its worker offered.
    `answers`: where answers go instead of the queue the generator yields from (ps.link sends
    each on its socket as it is put; put_nowait(None) ends the stream, get() returns once ended).
    Answers are wire.Frames: their pieces go out as they are on a socket, joined for gRPC."""

    def __init__(self, answers=None):
        self.answers = answers if answers is not None else asyncio.Queue()
        self.seg: shm.Segment | None = None
        self.worker = ""
        self.offering = asyncio.Lock()  # offers on one stream are taken one at a time
        self.lent: dict[int, tuple[list, int]] = {}  # lease -> (views of the slices answered by reference, bytes)
        self.lent_bytes = 0

    def lend(self, lease: int, views: list) -> int:
        """Hold these views until `release(lease)`; the bytes they span."""
        n = sum(v.nbytes for v in views)
        self.lent[lease] = (views, n)
        self.lent_bytes += n
        return n

    def release(self, lease: int) -> None:
        _, n = self.lent.pop(lease, (None, 0))
        self.lent_bytes -= n

    def end(self) -> None:
        self.answers.put_nowait(None)


class ParameterServerServicer:
    """Serves the ParameterServer service of ps.proto (registered through `wire.handler`).
    `shm`: offer shared memory to workers on this host (see ps.shm)."""

    def __init__(self, shard: Shard, pool: Executor, max_inflight_bytes: int, shm_enabled: bool = True):
        self.shard, self.pool = shard, pool
        self.admission = Admission(shard, max_inflight_bytes)
        self._streams: set[_Stream] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.host = shm.host_identity() if shm_enabled else ""
        self.local = None  # the co-located channel (ps.local.LocalServer), once it listens
        self.tcp = None  # the data port (ps.tcp.TcpServer), once it listens
        self.buffers = buffers.Pool()  # buffers of the sockets' large frames and split answers
        self.server_id = secrets.token_hex(16)  # named in the sockets' greetings (ps.link)
        self.shm_bytes = 0
        self.shm_published = 0
        self.arena: shm.Arena | None = None  # the slices' shared memory, from the first segment mapped on
        self._publishing = asyncio.Lock()
        self._leases = itertools.count(1)
        self.table_pool = ThreadPoolExecutor(max_workers=TABLE_THREADS, thread_name_prefix=f"ps-tables{shard.cfg.shard_id}")
        shard.on_stop(self._end_streams)
        shard.on_stop(lambda: self.table_pool.shutdown(wait=False))
        shard.on_depart(self._worker_gone)

    def _end_streams(self) -> None:
        """The server stops: end every open stream (its client sees it end, and retries elsewhere or
        after the restart), so a stop does not wait out its grace period for idle streams; close
        the published slices' memory files (what is still mapped goes with its last user)."""
        if self.arena is not None:
            self.arena.close()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: [st.end() for st in list(self._streams)])

    def _worker_gone(self, worker_id: str) -> None:
        """A worker left or was evicted (any thread): its streams with a segment end, which unmaps
        the segment here (a worker that comes back opens a new stream and offers a new one)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                lambda: [st.end() for st in list(self._streams) if st.seg is not None and st.worker == worker_id])

    async def _serve(self, method, request, context):
        if isinstance(request, wire.Malformed):
            self.shard.reject(InvalidArgument(request.reason))
        return await method(self, request, context)

    async def _copy(self, nbytes: int, fn, *args):
        """A shared-memory copy: on the loop when small, else on the pool (numpy leaves the GIL)."""
        if nbytes <= shm.INLINE_COPY:
            return fn(*args)
        return await self._pooled(fn, *args)

    async def _pooled(self, fn, *args, pool: Executor | None = None):
        """fn(*args) on the pool (or `pool`). Cancelled, it still waits for fn to end (a thread
        cannot be stopped): a withdrawn request has ended only once nothing touches its bytes."""
        job = (pool or self.pool).submit(functools.partial(fn, *args))
        fut = asyncio.wrap_future(job)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            job.cancel()  # dropped if it has not started; else it runs to its end, awaited here
            await asyncio.wait([fut])
            if not fut.cancelled():
                fut.exception()
            raise

    async def _offer(self, st: _Stream, rid: int, body: memoryview) -> bytes:
        """A worker offers its segment for this stream: map it (on the pool: reserving its pages
        takes time) if the probe holds (ps.shm); the answer to the offer."""
        try:
            async with st.offering:
                return await self._map(st, rid, body)
        except PSError as e:
            return wire.stream_failure(rid, e)
        except Exception as e:  # a bug: answer it, keep serving
            log.exception("internal error mapping a segment")
            return wire.stream_failure(rid, e)

    async def _map(self, st: _Stream, rid: int, body: memoryview) -> bytes:
        """(one offer at a time per stream) Check the offer, map the segment, answer the nonce."""
        try:
            name, nonce, worker_id = wire.read_segment_offer(body)
        except ValueError as e:
            self.shard.reject(InvalidArgument(str(e)))
        if not self.host:
            raise ShmUnavailable("this server does not offer shared memory (--no-shm, or no /proc to tell "
                                 "where it runs)")
        if st.seg is not None:
            raise InvalidArgument(f"this stream already has segment {st.seg.name}")
        self.shard.check_registered(worker_id)
        seg = await self._pooled(shm.Segment.attach, name, nonce)
        if self.shard.stopped or st not in self._streams:  # the stream ended meanwhile
            seg.close()
            raise Unavailable("the stream ended while its segment was being mapped")
        st.seg, st.worker = seg, worker_id
        log.info("shard %d: worker %s moves tensors through shared memory (%d bytes)", self.shard.cfg.shard_id,
                 worker_id, seg.size)
        await self._publish()
        return wire.stream_answer(rid, wire.Frame.of(seg.server_nonce))

    async def _publish(self) -> None:
        """From the first worker on shared memory on: the slices live in this server's arena
        (ps.shm), where co-located workers read pulls from (moved there on the pool, once)."""
        async with self._publishing:
            if self.arena is None:  # (set first: should this be cancelled, the move still ends)
                self.arena = shm.Arena(self.server_id)
                await self._pooled(self.shard.allocate_with, self.arena.empty)

    def _by_reference(self, st: _Stream) -> bool:
        """Whether a pull on this stream may be answered by reference now: the slices copy on
        write, and what the stream holds unreleased is at most twice the shard's bytes (beyond,
        a worker that does not release gets copies)."""
        return (self.arena is not None and self.shard.store.immutable
                and st.lent_bytes <= 8 * self.shard.store.elements)

    async def Stream(self, requests, context, answers=None):
        """Every method on one bidirectional stream of raw bytes (see `ps.wire`, the stream path):
        requests are served concurrently, each as its unary method would be, and answered by id
        as they complete. A malformed frame is answered INVALID_ARGUMENT (by id when it has one)
        and changes nothing; the stream itself goes on. With a segment (transport "shm"), request
        and answer bytes may lie in it instead of in the frames."""
        splits = getattr(answers, "splits", False)  # a plain socket's sink (ps.link): split answers can go
        st = _Stream(answers)
        answers = st.answers
        tasks: dict[int, asyncio.Task] = {}
        self._loop = asyncio.get_running_loop()
        if self.shard.stopped:
            return
        self._streams.add(st)

        async def serve(rid: int, name: str, body, desc, raw: bool) -> None:
            try:
                if desc is not None:
                    if st.seg is None:  # an offer still being mapped comes first
                        async with st.offering:
                            pass
                    try:
                        if st.seg is None:
                            raise InvalidArgument(f"stream request {rid} places bytes in shared memory, but this "
                                                  "stream has no segment")
                        if desc[1]:
                            st.seg.check(desc[0], desc[1], "the request")
                        if desc[3]:
                            st.seg.check(desc[2], desc[3], "the answer area")
                    except InvalidArgument as e:
                        self.shard.reject(e)
                borrowed = False
                if desc is not None and desc[1]:
                    self.shm_bytes += desc[1]
                    if name in _APPLIED_IN_PLACE:
                        body, borrowed = st.seg.borrow(desc[0], desc[1]), True
                    else:  # an init's parts are held: copied out (see _held_past_answer)
                        body = await self._copy(desc[1], st.seg.read, desc[0], desc[1])
                if name == "Pull" and desc is not None and desc[3] and raw and self._by_reference(st):
                    _ANSWER_AREA.set(_Published(self.arena, (st.seg, desc[2], desc[3])))
                elif name == "Pull" and desc is not None and desc[3]:
                    _ANSWER_AREA.set((st.seg, desc[2], desc[3]))
                elif name == "Pull" and raw and splits:
                    _ANSWER_AREA.set(self.buffers)
                request = wire.read_body(wire.request_reader(name), body)
                if borrowed and _held_past_answer(request):
                    body = await self._copy(desc[1], st.seg.read, desc[0], desc[1])
                    request = wire.read_body(wire.request_reader(name), body)
                del body
                out = await self._serve(getattr(type(self), name).__wrapped__, request, context)
                del request
                if isinstance(out, _Ref):
                    lease = next(self._leases)
                    self.shm_bytes += st.lend(lease, out.views)
                    self.shm_published += 1
                    chunks = list({id(c): c for c, _ in out.located}.values())
                    index = {id(c): j for j, c in enumerate(chunks)}
                    answer = wire.stream_ref_answer(rid, lease, out.meta, [(c.name, c.size, c.tag) for c in chunks],
                                                    [(index[id(c)], off) for c, off in out.located])
                elif isinstance(out, _Split):
                    answer = wire.stream_raw_answer(rid, out.meta, out.payload)
                elif isinstance(out, _InArea):
                    self.shm_bytes += out.nbytes
                    answer = wire.stream_shm_answer(rid, out.nbytes)
                elif desc is not None and desc[3] and (out := wire.message_bytes(out)).size <= desc[3] and st.seg:
                    await self._copy(out.size, st.seg.write, desc[2], out.chunks)
                    self.shm_bytes += out.size
                    answer = wire.stream_shm_answer(rid, out.size)
                else:
                    answer = wire.stream_answer(rid, out)
            except PSError as e:
                answer = wire.stream_failure(rid, e)
            except asyncio.CancelledError:
                return
            except Exception as e:  # a bug: keep serving, say so
                log.exception("internal error in %s (stream)", name)
                answer = wire.stream_failure(rid, e)
            finally:
                tasks.pop(rid, None)
            if answer.size > link.MAX_FRAME:  # (unary calls would fail the same way, in gRPC)
                answer = wire.stream_failure(rid, ResourceExhausted(
                    f"the answer to {name} takes {answer.size} bytes, more than the message limit"))
            answers.put_nowait(answer)

        def refuse(rid: int, e: InvalidArgument) -> None:
            with contextlib.suppress(PSError):
                self.shard.reject(e)
            answers.put_nowait(wire.stream_failure(rid, e))

        async def read() -> None:
            try:
                async for data in requests:
                    try:
                        req = wire.read_stream_request(data)
                    except ValueError as e:
                        refuse(int.from_bytes(bytes(data[1:5]), "little") if len(data) >= 5 else 0,
                               InvalidArgument(str(e)))
                        continue
                    rid = req.rid
                    if req.code == wire.CANCEL:
                        task = tasks.pop(rid, None)
                        if task is not None:
                            task.cancel()
                            # Answered CANCELLED once it has really ended (work on the pool
                            # included): the worker may then use that request's areas again.
                            task.add_done_callback(lambda _, rid=rid: answers.put_nowait(wire.stream_error(
                                rid, grpc.StatusCode.CANCELLED, "Cancelled", "the request was withdrawn")))
                    elif req.code == wire.RELEASE:
                        try:
                            for lease in wire.read_release(req.body):
                                st.release(lease)  # (one not lent here, or released already: nothing to do)
                        except ValueError as e:
                            refuse(rid, InvalidArgument(str(e)))
                    elif rid in tasks:
                        refuse(rid, InvalidArgument(f"stream request id {rid} is already in use"))
                    elif req.code == wire.SEGMENT:
                        async def offer(rid=rid, body=req.body) -> None:
                            try:
                                answers.put_nowait(await self._offer(st, rid, body))
                            finally:
                                tasks.pop(rid, None)

                        tasks[rid] = asyncio.ensure_future(offer())
                    else:  # (a request in shared memory is checked against the segment when served)
                        tasks[rid] = asyncio.ensure_future(serve(rid, wire.STREAM_NAMES[req.code], req.body, req.shm,
                                                                      req.raw))
                if tasks:  # the client is done sending: answer what it asked, then end
                    await asyncio.gather(*tasks.values(), return_exceptions=True)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug (each request's errors are answered by id): say so, end the stream
                log.exception("internal error reading a stream")
            finally:
                answers.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer.tobytes()
        finally:
            self._streams.discard(st)
            if st.lent:  # a worker may still be copying what it was last answered: held a while longer
                asyncio.get_running_loop().call_later(LENT_GRACE, st.lent.clear)
            reader.cancel()
            for task in list(tasks.values()):
                task.cancel()
            # Copies on the pool may still run: unmap once they are done (ps.shm.Segment.close
            # leaves a mapping still in use to its last user).
            if st.seg is not None:
                seg, st.seg = st.seg, None
                await asyncio.gather(*tasks.values(), return_exceptions=True)
                seg.close()

    async def _run(self, elements: int, fn, *args):
        """fn(*args) on the loop when the shard and the request are small, else on the pool."""
        if max(elements, self.shard.store.elements) <= INLINE_ELEMENTS:
            return fn(*args)
        return await self._pooled(fn, *args)

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

    async def _until(self, ask, forget=None):
        """Await `ask(wake)`: it answers (not None) or registers `wake`, which the shard calls
        (once, from any thread) when its state moves; then ask again. No thread is held.
        `forget(wake)` withdraws it when the wait is abandoned (default: the shard's)."""
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
                (forget or self.shard.forget)(wake)
                raise

    async def _wait(self, worker_id: str, clock: int) -> None:
        """Until a worker at `clock` may read."""
        await self._until(lambda wake: self.shard.ready_or_wait(worker_id, clock, wake) or None)

    async def _pull(self, worker_id: str, fingerprint: str, clock: int, keys: list[str]) -> wire.Frame:
        self.shard.check_pull(worker_id, fingerprint, clock, keys)
        await self._wait(worker_id, clock)
        nbytes = 4 * sum(self.shard.store.params[k].numel() for k in keys)
        area = _ANSWER_AREA.get()
        encode = _encode_pull if area is None else functools.partial(_encode_pull, area=area)
        async with self.admission.hold(nbytes):  # (a split answer sends the views it may keep as they are)
            return await self._run(nbytes // 4, self.shard.read, keys, encode, isinstance(area, (buffers.Pool, _Published)))

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
        self.table_pool.submit(self.shard.tables.settle)  # the quorum may be complete now
        cfg = self.shard.cfg
        return pb.RegisterResponse(
            **out, mode=cfg.mode, staleness=cfg.staleness, num_workers=cfg.num_workers,
            worker_timeout=cfg.worker_timeout, shard_id=cfg.shard_id, num_shards=cfg.num_shards,
            backup_workers=cfg.backup_workers,
            transports=["unary", "stream", *(["tcp"] if self._data_port() else []), *(["shm"] if self.host else [])],
            host=self.host, local_socket=self._local_socket(), data_port=self._data_port(),
            server_id=self.server_id,
        )

    def _data_port(self) -> int:
        """The data port for workers elsewhere (0 once it no longer listens)."""
        return self.tcp.port if self.tcp is not None and self.tcp.listening else 0

    def _local_socket(self) -> str:
        """The local socket's name for a co-located worker ("" once it no longer listens)."""
        return self.local.name if self.local is not None and self.local.listening else ""

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
        self.table_pool.submit(self.shard.tables.settle)  # table steps stop waiting for it
        return pb.Ack()

    # -- embedding tables (ps.server.table) ------------------------------------------------------
    async def _tabled(self, fn, *args):
        """A table call, on threads of the tables' own: a checkpoint holds the tables' lock while it
        writes them, and table calls waiting for it must hold neither the event loop nor the
        threads dense requests use."""
        return await self._pooled(fn, *args, pool=self.table_pool)

    def _rows_in(self, rows, grads: bool) -> list[RowsIn]:
        """Decode a request's tables. A pull is checked here, before it waits; a push where it is
        applied (on the tables' threads: its gradients are scanned for NaN there, not on the loop)."""
        tables = self.shard.tables
        try:
            out = []
            for msg in rows:
                ids = ids_from_proto(msg)
                values = values_from_proto(msg, len(ids), tables.table(msg.table).spec.dim) if grads else None
                out.append(RowsIn(msg.table, ids, values))
            if not grads:
                tables.check(out)
            return out
        except (InvalidArgument, UnknownTable) as e:
            self.shard.reject(e)

    @_rpc
    async def InitTables(self, request, context):
        try:
            specs = [table_spec_from_proto(t) for t in request.tables]
        except InvalidArgument as e:
            self.shard.reject(e)
        tables = self.shard.tables
        created = await self._tabled(tables.declare, specs)
        return pb.InitTablesResponse(created=created, mode=tables.policy.name,
                                     staleness=getattr(tables.policy, "staleness", 0), version=tables.version)

    @_rpc
    async def PullRows(self, request, context):
        tables = self.shard.tables
        entries = self._rows_in(request.tables, grads=False)
        if tables.policy.name == "sync" and request.worker_id:
            await self._tabled(tables.arrive, request.worker_id, request.clock)
        await self._until(lambda wake: tables.ready_or_wait(request.worker_id, request.clock, wake) or None,
                          tables.forget)
        values, version = await self._tabled(tables.read, entries)
        self.shard.count("bytes_pulled", sum(v.numel() * 4 for v in values))
        return wire.rows_message_frame(pb.PullRowsResponse(version=version),  # the rows' bytes as they are
                                       [wire.rows_frame(e.table, values=v.numpy()) for e, v in zip(entries, values)])

    @_rpc
    async def PushRows(self, request, context):
        entries = self._rows_in(request.tables, grads=True)
        nbytes = sum(len(m.values) + len(m.ids) for m in request.tables)
        try:
            async with self.admission.hold(nbytes):
                outcome, version, staleness = await self._tabled(
                    self.shard.tables.push, request.worker_id, request.clock, request.base_version, entries)
        except (InvalidArgument, UnknownTable) as e:
            self.shard.reject(e)
        if outcome != "DUPLICATE":
            self.shard.count("bytes_pushed", nbytes)
        return pb.PushResponse(outcome=pb.PushResponse.Outcome.Value(outcome), version=version, staleness=staleness)

    @_rpc
    async def Stats(self, request, context):
        tables = self.shard.tables
        return stats_to_proto({**self.shard.stats(), "tables": tables.stats(), "table_mode": tables.policy.name,
                               "table_version": tables.version,
                               "shm_segments": sum(1 for st in self._streams if st.seg),
                               "shm_bytes": self.shm_bytes, "shm_published": self.shm_published,
                               "shm_lent_bytes": sum(st.lent_bytes for st in self._streams)})
