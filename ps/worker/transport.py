"""The client's transport: one grpc.aio channel per server, all on one event loop that runs on
a thread of the client's own, and one way to make a call (errors mapped to PSError, retries
with backoff while a server is down or overloaded, one re-registration when it no longer knows
the worker). Fan-outs are coroutines gathered on that loop: no thread per call, no pool that
a nested fan-out could exhaust."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import math
import struct
import threading
import time
import weakref
from typing import Awaitable, Callable, Coroutine, Sequence, TypeVar

import grpc

from ps import buffers, link, local, shm, tcp, tls, wire
from ps.config import MAX_MESSAGE_BYTES, TRANSPORTS, grpc_options
from ps.errors import (Cancelled, DeadlineExceeded, InvalidArgument, NotInitialized, Overloaded, PSError,
                       ResourceExhausted, ShmUnavailable, Unauthenticated, Unavailable, UnknownWorker,
                       error_from_wire)
from ps.proto import ps_pb2 as pb
from ps.server.servicer import ERROR_CLASS_KEY

log = logging.getLogger("ps.worker")
WAITING_NOTICE = 10.0  # seconds between "waiting for server" warnings while a call retries
T = TypeVar("T")
DEFAULT = object()  # "use the transport's rpc_timeout"
# A call that failed with these is tried again, with backoff. CANCELLED from the other side (this
# client's own cancellations surface as asyncio.CancelledError, never as a status) means the
# server or the connection gave up on the call, as with UNAVAILABLE: every call is safe to repeat.
RETRIED = (Unavailable, Overloaded, Cancelled)


OFFER_TIMEOUT = 30.0  # seconds a server has to map an offered segment
REF_FAILURES = 3  # chunks of a server's published slices that cannot be mapped, in a row, before its pulls are copied
WINDOW_IDLE = 10.0  # seconds a mapped chunk no answer named is kept
SOCKET_RETRY = 60.0  # at most this many seconds between tries of a socket that could not be reached
RAW_MIN = 64 << 10  # a pull answer this large comes as a split frame on a plain socket (into place)


def mapped(e: grpc.RpcError) -> PSError:
    """The PSError a failed call stands for (the class the server raised, or its status code's)."""
    meta = dict(e.trailing_metadata() or ())
    return error_from_wire(e.code().name, meta.get(ERROR_CLASS_KEY), e.details() or "")


def _expire(fut: asyncio.Future) -> None:
    """A request's deadline passed before its answer came."""
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


def _retrieve(task: asyncio.Future) -> None:
    """A background task's outcome is read (its error, if any, was handled where it mattered)."""
    if not task.cancelled():
        task.exception()


class _Open:
    """One open `Stream` call, the requests waiting for their answers on it, and its segment
    (transport "shm": the areas of its requests and answers; see ps.shm)."""

    def __init__(self, call):
        self.call = call
        self.pending: dict[int, asyncio.Future] = {}
        self.ready: asyncio.Future | None = None  # the segment offer, while it is being made
        self.seg: shm.Segment | None = None
        self.requests: shm.Areas | None = None
        self.answers: shm.Areas | None = None
        # Areas of requests this worker withdrew (cancelled, timed out), by request id: free again
        # once the server answers that id (its answer, or CANCELLED once it has really stopped).
        self.retired: dict[int, list] = {}
        self.draining = False  # no new requests: it ends once those on it are answered (Mux.leave_grpc)
        self.closed = False  # its reader has ended: nothing more will be answered on it
        # Requests withdrawn in the very turn their answer was read (a deadline, a cancellation):
        # the server is done with their areas.
        self.late: set[int] = set()
        # Pulls whose answers may come as split frames (a plain socket): where their tensors'
        # bytes go, by request id (see Mux._route).
        self.routes: dict[int, Callable] = {}
        self.placed: dict[int, list] = {}  # the buffers a route gave, while its answer is awaited

    def close_segment(self) -> None:
        seg, self.seg = self.seg, None
        if seg is not None:
            seg.close()


class Mux:
    """One shard's stream path: every request on one bidirectional stream, tagged by id, answers
    matched back as they come (see ps.wire). A broken stream fails its waiting requests with the
    status it ended with (UNAVAILABLE while a server restarts: retried like any call); the next
    request opens a new one."""

    def __init__(self, stub: wire.Stub, server: str, metadata, context=None, pool: buffers.Pool | None = None):
        self._stub, self.server, self.metadata = stub, server, metadata
        self.context = context  # TLS for the data port (ps.tcp), when the channel has it
        self.pool = pool or buffers.Pool()  # buffers of the sockets' large frames
        self._open: _Open | None = None
        self._ids = itertools.cycle(range(1, 1 << 32))  # the header's u32
        self._writing = asyncio.Lock()
        # Shared memory: (worker id, bytes of each of the request and answer regions) to offer a
        # segment of on each new stream; None: none (no co-located server, or it failed for good).
        self.shm: tuple[str, int] | None = None
        self.shm_note = ""  # why shared memory is not used, once it failed
        # The server's local socket (ps.local) while shared memory is wanted, or its data port
        # (ps.tcp) while "tcp" is: new streams go there instead of gRPC. None: not offered.
        # Connecting there failed: the gRPC stream meanwhile, trying again after a backoff
        # (doubling to SOCKET_RETRY), or at once when a Register names the socket again.
        self.local: str | None = None
        self.remote: int | None = None
        self.server_id: str | None = None  # the id the server gave at Register (its sockets greet with it)
        self._retry_at, self._backoff = 0.0, 1.0
        # After a failed try, the socket is tried again in the background (`_probe`) while the
        # calls go on over gRPC; a connection it made (`_ready`) is taken by the next stream.
        self._probe: asyncio.Task | None = None
        self._ready: link.Call | None = None
        self._closed = False
        self._opening = asyncio.Lock()
        # The server's published slices (ps.shm.Arena), mapped read-only as its answers name them;
        # `by_reference` goes off after REF_FAILURES chunks in a row cannot be (its pulls are then
        # answered by copy) until the server's id changes (`forget_windows`).
        self.windows: dict[str, shm.Window] = {}
        self.by_reference = True
        self.ref_failures = 0  # chunks that could not be mapped, in a row

    def _socket_due(self) -> bool:
        """A socket is wanted and may be tried (now, or again after a failed try's backoff)."""
        return (self.local is not None or self.remote is not None) and time.monotonic() >= self._retry_at

    def _socket_failed(self, e: BaseException, what: str) -> None:
        level = logging.WARNING if self._backoff == 1.0 else logging.DEBUG  # (said once, then quietly)
        log.log(level, "server %s: %s not reached (%s); using the gRPC stream, trying again in %.0fs",
                self.server, what, e, self._backoff)
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(2 * self._backoff, SOCKET_RETRY)

    def _connect(self) -> Awaitable[link.Call | None]:
        return self._connect_local() if self.local is not None else self._connect_remote()

    async def _try_again(self) -> None:
        """(In the background, once a failed try's backoff is over) the socket again; a
        connection made is taken by the next stream (the gRPC one ends once drained)."""
        try:
            call = await self._connect()
        finally:
            self._probe = None
        if call is None:
            return
        s = self._open
        if self._ready is not None or (s is not None and isinstance(s.call, link.Call)) or self._closed:
            call.cancel()  # (a stream there already, or the client is closing)
            return
        self._ready = call
        self.leave_grpc()

    async def _stream(self) -> _Open:
        s = self._open
        if s is not None and not isinstance(s.call, link.Call) and self._probe is None and self._socket_due():
            self._probe = asyncio.ensure_future(self._try_again())  # calls meanwhile go on over gRPC
        if self._open is None:
            async with self._opening:  # one new stream at a time (connecting a local one awaits)
                if self._open is None:
                    call, self._ready = self._ready, None
                    if call is not None and call.conn.closed:  # (ended while it waited)
                        call = None
                    if call is None and self._retry_at == 0.0 and self._socket_due():
                        call = await self._connect()  # the first try waits for it; later ones do not
                    if call is not None:
                        self._backoff = 1.0
                    s = self._open = _Open(call or self._stub.Stream(metadata=self.metadata))
                    if call is not None and call.splits:
                        call.conn.router = functools.partial(self._route, s)
                    asyncio.ensure_future(self._read(s))
                    if self.shm is not None:
                        s.ready = asyncio.ensure_future(self._offer(s, *self.shm))
        s = self._open
        if s.ready is not None and not s.ready.done():
            await asyncio.shield(s.ready)
        return s

    async def _offer(self, s: _Open, worker_id: str, region_bytes: int) -> None:
        """Offer the new stream a segment (ps.shm); on any failure the stream goes on without."""
        loop = asyncio.get_running_loop()
        creating = loop.run_in_executor(None, shm.Segment.create, shm.HEADER + 2 * region_bytes)
        try:
            seg = await asyncio.shield(creating)
        except ShmUnavailable as e:
            self._no_shm(e, lasting=True)
            return
        except asyncio.CancelledError:  # the client is closing: the segment goes once it is made
            await asyncio.wait([creating])
            if not creating.cancelled() and creating.exception() is None:
                creating.result().close()
            raise
        rid = next(self._ids)
        fut = loop.create_future()
        s.pending[rid] = fut
        try:
            await self._send(s, wire.segment_offer(rid, seg.name, seg.worker_nonce, worker_id))
            status, body = await asyncio.wait_for(asyncio.shield(fut), OFFER_TIMEOUT)
            if status is not None:
                raise wire.read_stream_failure(status, body)
            if bytes(body) != seg.server_nonce:
                raise ShmUnavailable(f"server {self.server} mapped a segment, but this worker does not see its nonce "
                                     "there: the two do not share memory")
        except (PSError, asyncio.TimeoutError) as e:
            self._forget(s, rid)
            seg.close()
            # Not shared (another host) or not offered: for good. Else (the stream broke, the
            # worker is not registered yet): the next stream offers again.
            self._no_shm(e, lasting=isinstance(e, ShmUnavailable))
            return
        finally:
            seg.release()  # the server has opened it (or never will)
            if fut.done() and not fut.cancelled():
                fut.exception()
        if self._open is not s:  # the stream ended meanwhile
            seg.close()
            return
        s.seg, s.requests = seg, shm.Areas(shm.HEADER, shm.HEADER + region_bytes)
        s.answers = shm.Areas(shm.HEADER + region_bytes, seg.size)
        self.shm_note = ""
        log.info("server %s: tensors go through shared memory (%d bytes)", self.server, seg.size)

    @property
    def _authorization(self) -> str:
        return dict(self.metadata or ()).get("authorization", "")

    async def _connect_local(self) -> link.Call | None:
        """A stream over the server's local socket; None (the gRPC stream then) if it cannot be
        reached: the server went away (a restarted one names a new socket at Register, which the
        gRPC stream leads to) or does not share this network namespace after all."""
        try:
            return await local.connect(self.local, self._authorization, pool=self.pool, server_id=self.server_id)
        except (OSError, ValueError, asyncio.TimeoutError, Unavailable) as e:
            self._socket_failed(e, "local socket")
            return None

    async def _connect_remote(self) -> link.Call | None:
        """A stream over the server's data port; None (the gRPC stream then) if it cannot be
        reached (a firewall between; another process answers there; the server went away: a
        restarted one names its port at Register, which the gRPC stream leads to)."""
        try:
            return await tcp.connect(tcp.host_of(self.server), self.remote, self._authorization, self.context,
                                     pool=self.pool, server_id=self.server_id)
        except (OSError, asyncio.TimeoutError, Unavailable) as e:  # (ssl.SSLError is an OSError)
            self._socket_failed(e, f"data port {self.remote}")
            return None

    def retry_now(self) -> None:
        """(At Register, which may name a new socket) the next stream tries the socket first."""
        self._retry_at, self._backoff = 0.0, 1.0
        if self._ready is not None:  # (made for what the server named before)
            self._ready.cancel()
            self._ready = None

    def leave_grpc(self) -> None:
        """The server names a socket now (it restarted, say, while this worker was on the gRPC
        stream, or its data port was not reachable then): new requests open a stream there; the
        gRPC one ends once its requests are answered."""
        s = self._open
        if (self.local is None and self.remote is None) or s is None or isinstance(s.call, link.Call):
            return
        self._open = None
        s.draining = True
        self._ended_if_drained(s)

    def reoffer(self) -> None:
        """After registering again: an open stream without a segment (its offer came while the
        worker was not registered, e.g. evicted) is offered one again."""
        s = self._open
        if self.shm is not None and s is not None and s.seg is None and (s.ready is None or s.ready.done()):
            s.ready = asyncio.ensure_future(self._offer(s, *self.shm))

    def _no_shm(self, e: BaseException, lasting: bool) -> None:
        note = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if lasting:
            self.shm = None
        if note != self.shm_note:
            log.warning("server %s: shared memory is not used%s (%s); the stream path carries the tensors",
                        self.server, "" if lasting else " on this stream", note)
        self.shm_note = note

    @property
    def in_shm(self) -> bool:
        """Whether the open stream moves large requests and answers through shared memory."""
        return self._open is not None and self._open.seg is not None

    @property
    def on_local(self) -> bool:
        """Whether the open stream goes over the server's local socket (ps.local), not gRPC."""
        return self._on("local")

    @property
    def on_tcp(self) -> bool:
        """Whether the open stream goes over the server's data port (ps.tcp), not gRPC."""
        return self._on("tcp")

    def _on(self, kind: str) -> bool:
        s = self._open
        return s is not None and isinstance(s.call, link.Call) and s.call.kind == kind

    async def _read(self, s: _Open) -> None:
        error: PSError = Unavailable(f"server {self.server} ended the stream")
        try:
            while (data := await s.call.read()) is not grpc.aio.EOF:
                if isinstance(data, link.Split):
                    rid, status, meta = wire.read_stream_answer(data.head)
                    body = (meta, data.tail) if status is wire.IN_RAW else meta
                else:
                    rid, status, body = wire.read_stream_answer(data)
                fut = s.pending.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result((status, body))
                else:  # nobody reads it: what it named by reference is released
                    self._release_unread(s, status, body)
                    if fut is not None:  # withdrawn this turn: its caller gives its areas back
                        s.late.add(rid)
                    elif rid in s.retired:  # a withdrawn request the server is done with
                        self._give_back(s, s.retired.pop(rid))
                if self._ended_if_drained(s):
                    break
        except grpc.RpcError as e:
            # The stream's own status concerns the connection, not one request (each request's
            # error comes back in its answer): retried, as a call to a server that went away is,
            # unless the stream was refused for a missing token.
            error = mapped(e)
            if not isinstance(error, Unauthenticated):
                error = Unavailable(f"server {self.server}: the stream broke ({type(error).__name__}: {error})")
        except struct.error as e:
            error = Unavailable(f"server {self.server} sent a malformed stream answer ({e})")
        except asyncio.CancelledError:
            error = Unavailable("the client is closing")
            raise
        finally:
            s.closed = True
            if self._open is s:
                self._open = None
            if isinstance(s.call, link.Call):
                s.call.cancel()  # (the next stream connects again: to a server gone, that fails at once)
            for fut in s.pending.values():
                if not fut.done():
                    fut.set_exception(error)
            s.pending.clear()
            s.close_segment()

    async def _send(self, s: _Open, data: bytes) -> None:
        try:
            async with self._writing:
                await s.call.write(data)
        except grpc.RpcError as e:
            raise mapped(e) from e
        except (asyncio.InvalidStateError, grpc.aio.UsageError) as e:  # the call had already ended
            raise Unavailable(f"server {self.server}: the stream ended ({e})") from e

    async def _place(self, s: _Open, body: wire.Frame, answer_bytes: int):
        """Areas of the stream's segment for a request's bytes (large ones) and its answer (large
        ones expected): (descriptor or None, [(areas, offset) taken])."""
        if s.seg is None:
            return None, []
        seg, taken = s.seg, []
        r = s.requests.take(body.size) if body.size >= shm.MIN_BYTES else None
        if r is not None:
            taken.append((s.requests, r))
        a = s.answers.take(answer_bytes) if answer_bytes >= shm.MIN_BYTES else None
        if a is not None:
            taken.append((s.answers, a))
        if not taken:
            return None, []
        if r is not None:
            try:
                if body.size <= shm.INLINE_COPY:
                    seg.write(r, body.chunks)
                else:  # on a thread; a cancelled caller waits for it to end, then gives the areas back
                    write = asyncio.get_running_loop().run_in_executor(None, seg.write, r, body.chunks)
                    try:
                        await asyncio.shield(write)
                    except asyncio.CancelledError:
                        await asyncio.wait([write])
                        raise
            except BaseException:
                self._give_back(s, taken)
                raise
        return (r or 0, body.size if r is not None else 0, a or 0, answer_bytes if a is not None else 0), taken

    @staticmethod
    def _route(s: _Open, head: bytes) -> list | None:
        """(SocketConn's router) Where a split answer's tensors go: the buffers its pull's `place`
        gives for them, or None (a pooled buffer)."""
        rid, status, meta = wire.read_stream_answer(head)
        place = s.routes.get(rid) if status is wire.IN_RAW else None
        views = None if place is None else place(pb.PullResponse.FromString(bytes(meta)))
        if views is not None:
            s.placed[rid] = views
        return views

    async def request(self, method: str, message, timeout: float | None, answer_bytes: int = 0, place=None):
        """One request; `answer_bytes`: about how large its answer will be (a pull's), so that a
        large one can be placed in shared memory. An answer read from shared memory holds views
        of it that stay valid until the caller next awaits: read it at once. `place` (a Pull's):
        given the answer's PullResponse without payloads, the buffers (one per tensor, in order)
        its bytes may be received straight into, or None; used on a plain socket."""
        rid = next(self._ids)
        body = wire.message_bytes(message)
        if body.size + 5 > MAX_MESSAGE_BYTES:  # refused here, as unary refuses it: the stream is not broken
            raise ResourceExhausted(f"a {method} request of {body.size + 5} bytes is larger than the message limit "
                                    f"({MAX_MESSAGE_BYTES})")
        s = await self._stream()
        desc, taken = await self._place(s, body, answer_bytes)
        seg = s.seg
        raw = (place is not None and answer_bytes >= RAW_MIN and (desc is None or not desc[3])
               and isinstance(s.call, link.Call) and s.call.splits)
        ref = method == "Pull" and desc is not None and bool(desc[3]) and self.by_reference and bool(self.server_id)
        frame = wire.stream_request(method, rid, body, desc, raw=raw or ref)
        fut = asyncio.get_running_loop().create_future()
        s.pending[rid] = fut
        if raw:
            s.routes[rid] = place
        answered = False
        timer = None
        try:
            if s.closed:  # it ended while this request was being placed: nothing would answer it
                raise Unavailable(f"server {self.server}: the stream ended")
            try:
                if isinstance(s.call, link.Call):  # queued at once, in order; a cancelled drain loses nothing
                    if s.call.write_nowait(frame, owner=rid):
                        await asyncio.wait_for(s.call.drain(), timeout)  # (a server that stops reading)
                else:  # the write goes on if this caller is cancelled: cancelling a write cancels the whole call
                    write = asyncio.ensure_future(self._send(s, frame.tobytes()))
                    write.add_done_callback(_retrieve)
                    await asyncio.shield(write)
            except PSError as e:  # the stream ended: the status it ended with tells why (read side)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fut), 1.0)
                raise (fut.exception() if fut.done() and not fut.cancelled() and fut.exception() else
                       Unavailable(f"server {self.server}: the stream broke ({type(e).__name__}: {e})")) from None
            if timeout is not None:
                timer = asyncio.get_running_loop().call_later(timeout, _expire, fut)
            status, answer = await fut  # (cancelling this caller cancels fut: see below)
            answered = True
        except asyncio.TimeoutError:
            self._cancel(s, rid)
            raise DeadlineExceeded(f"server {self.server}: {method} took longer than {timeout:.0f}s") from None
        except asyncio.CancelledError:
            self._cancel(s, rid)
            raise
        except PSError:
            self._forget(s, rid)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            s.routes.pop(rid, None)
            placed = s.placed.pop(rid, None)
            if placed is not None and not answered:  # withdrawn while it may still be arriving there
                s.call.conn.divert(placed)
            if fut.done() and not fut.cancelled():
                if fut.exception() is None and not answered:  # answered as its caller went away
                    self._release_unread(s, *fut.result())
            else:
                fut.cancel()
            if not answered and taken:
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    self._give_back(s, taken)  # it was answered after all: the server is done with them
                elif rid in s.late:  # withdrawn as its answer came: the server is done with them
                    self._give_back(s, taken)
                elif self._open is s and rid not in s.pending:  # withdrawn: free once the server says it is done
                    s.retired[rid] = taken
            s.late.discard(rid)
        if status is wire.IN_RAW:
            out = wire.raw_pull(*answer)
        elif status is wire.IN_REF:
            self._give_back(s, taken)
            if not ref:
                self._release_unread(s, status, answer)
                return wire.Malformed("an answer by reference it was not asked for")
            return self._referenced(s, answer)
        elif status is wire.IN_SHM:
            n = wire.shm_answer_length(answer)
            if desc is None or not desc[3] or n > desc[3] or seg is None or seg.bytes is None:
                self._give_back(s, taken)
                raise Unavailable(f"server {self.server} answered {method} in shared memory it was not given")
            out = wire.read_body(wire.response_reader(method), seg.view(desc[2], n))
        elif status is None:
            out = wire.read_body(wire.response_reader(method), answer)
        else:
            self._give_back(s, taken)
            raise wire.read_stream_failure(status, answer)
        self._give_back(s, taken)
        return out

    def _referenced(self, s: _Open, body: memoryview) -> wire.PullIn | wire.Malformed:
        """A Pull answered by reference: its tensors are read-only views of the server's published
        slices, held for this worker until the PullIn's `done` is called (after they were copied;
        Pulled.absorb) or the PullIn is gone. A chunk that cannot be mapped here fails the call
        UNAVAILABLE (retried: the chunk may have closed meanwhile, the server stopping); after
        REF_FAILURES such in a row, this server's pulls are copied. Chunks no answer named for
        WINDOW_IDLE seconds are unmapped (the server may have closed them)."""
        try:
            lease, header, chunks, refs = wire.read_ref_answer(body)
        except ValueError as e:
            self._release_unread(s, wire.IN_REF, body)
            return wire.Malformed(str(e))
        release = functools.partial(self._release_soon, s, lease, asyncio.get_running_loop())
        now = time.monotonic()
        try:
            windows = []
            for name, size, tag in chunks:
                w = self.windows.get(name)
                if w is None or (w.size, w.tag) != (size, tag):  # (a later chunk on the same fd)
                    if w is not None:
                        w.close()
                    w = self.windows[name] = shm.Window(name, size, tag, self.server_id or "")
                w.named = now
                windows.append(w)
            tensors = [wire.WireTensor(t.key, t.dtype, tuple(t.shape), windows[i].view(off, 4 * math.prod(t.shape)),
                                       memoryview(b"")) for t, (i, off) in zip(header.tensors, refs)]
        except (ShmUnavailable, InvalidArgument) as e:
            release()
            if isinstance(e, ShmUnavailable):
                self.ref_failures += 1
                if self.ref_failures >= REF_FAILURES:
                    self.by_reference = False
                    log.warning("server %s: its published slices cannot be read here (%s); its pulls are copied",
                                self.server, e)
                raise Unavailable(f"server {self.server}: {e}") from e
            return wire.Malformed(str(e))
        self.ref_failures = 0
        for name, w in list(self.windows.items()):
            if now - w.named > WINDOW_IDLE:
                del self.windows[name]
                w.close()
        header.ClearField("tensors")
        out = wire.PullIn(header, tensors)
        out.done = weakref.finalize(out, release)  # called once: by the reader, or when the answer is gone
        return out

    def _release_unread(self, s: _Open, status, body) -> None:
        """An answer nobody will read: the slices it named by reference are released."""
        if status is wire.IN_REF and len(body) >= 8:
            self._send_release(s, int.from_bytes(bytes(body[:8]), "little"))

    def _release_soon(self, s: _Open, lease: int, loop: asyncio.AbstractEventLoop) -> bool:
        """(any thread) Tell the server this worker has read lease's slices: at once on the loop
        (before the caller's next request, a push that may update them in place then), else
        from the loop soon. False when the stream had ended: the server holds a stream's
        slices only a while after (servicer.LENT_GRACE), so what was read may be torn."""
        intact = not s.closed
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._send_release(s, lease)
        else:
            with contextlib.suppress(RuntimeError):  # the loop was closed: the server ends the stream
                loop.call_soon_threadsafe(self._send_release, s, lease)
        return intact

    def _send_release(self, s: _Open, lease: int) -> None:
        if s.closed:
            return
        frame = wire.stream_release([lease])
        if isinstance(s.call, link.Call):
            with contextlib.suppress(PSError):  # it broke: the server ended the stream
                s.call.write_nowait(frame)
        else:
            task = asyncio.ensure_future(self._send(s, frame))
            task.add_done_callback(_retrieve)

    @staticmethod
    def _give_back(s: _Open, taken) -> None:
        """Areas answered for are free again (views of an answer stay valid until the caller's next await)."""
        if s.seg is not None:
            for areas, offset in taken:
                areas.give_back(offset)

    async def close(self) -> None:
        """End the open stream and wait until gRPC has finished with it (its completion events
        must not arrive after the client's event loop is closed)."""
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
        if self._ready is not None:
            self._ready.cancel()
            self._ready = None
        s, self._open = self._open, None
        if s is not None:
            s.call.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.call.code(), 2.0)
        self.forget_windows()

    def forget_windows(self) -> None:
        """Unmap the server's published chunks (a view still being read keeps its mapping)."""
        for w in self.windows.values():
            w.close()
        self.windows.clear()
        self.by_reference, self.ref_failures = True, 0

    @staticmethod
    def _ended_if_drained(s: _Open) -> bool:
        """A draining stream with nothing pending ends (which withdraws what it carried)."""
        if s.draining and not s.pending:
            s.call.cancel()
            return True
        return False

    def _forget(self, s: _Open, rid: int) -> bool:
        """Stop waiting for request `rid`'s answer; whether it was awaited."""
        if s.pending.pop(rid, None) is None:
            return False
        self._ended_if_drained(s)
        return True

    def _cancel(self, s: _Open, rid: int) -> None:
        """Withdraw a request the caller no longer waits for (the server stops serving it). What
        of it a socket has not sent yet is copied: its caller may change that memory now."""
        if isinstance(s.call, link.Call):
            s.call.own(rid)
        if self._forget(s, rid) and not s.closed and (self._open is s or (s.draining and s.pending)):
            task = asyncio.ensure_future(self._send(s, wire.stream_request("", rid, None).tobytes()))
            task.add_done_callback(_retrieve)  # best effort


class Transport:
    """Channels to `servers` on a private event loop. `run` and `submit` hand it coroutines from
    any other thread; everything else runs on the loop."""

    def __init__(self, servers: Sequence[str], *, metadata=None, retry_timeout: float = 60.0,
                 rpc_timeout: float = 120.0, tls_ca: str = "", tls_cert: str = "", tls_key: str = "",
                 transport: str = "unary"):
        if transport not in TRANSPORTS:
            raise InvalidArgument(f"transport ({transport!r}) must be one of {', '.join(TRANSPORTS)}")
        self.transport = transport
        self.servers = list(servers)
        self._mux: list[Mux | None] = [None] * len(self.servers)
        self.metadata, self.retry_timeout, self.rpc_timeout = metadata, retry_timeout, rpc_timeout
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="ps-client-loop")
        self._thread.start()
        self._tls = (tls_ca, tls_cert, tls_key)
        self._context = tls.client_ssl_context(tls_ca, tls_cert, tls_key) if tls_ca else None  # (for ps.tcp)
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[wire.Stub] = []
        self._told = [0.0] * len(self.servers)  # per server: when the user was last told it is awaited
        # Calls that waited out a server that was unreachable or had forgotten this worker (a
        # retry after an error, or registering again): answers other servers gave before such a
        # wait may be old by its end (see PSClient's pulls).
        self.recoveries = 0
        # For shared memory (set by the client once it knows its plan): the worker id its segments
        # are bound to, and per shard the bytes of each of a segment's two regions.
        self.worker_id = ""
        self.shm_regions: list[int] | None = None
        self.pool = buffers.Pool()  # buffers of the sockets' large frames (all shards')
        self.run(self._open())

    async def _open(self) -> None:
        ca, cert, key = self._tls
        self._channels = [tls.aio_channel(s, grpc_options(), ca, cert, key) for s in self.servers]
        self._stubs = [wire.Stub(c) for c in self._channels]

    # -- from other threads -------------------------------------------------------------------
    def run(self, coro: Coroutine[object, object, T]) -> T:
        """Run `coro` on the loop and wait for its result (from any thread but the loop's)."""
        self._check_open(coro)
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("Transport.run called on its own event loop: await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _check_open(self, coro) -> None:
        if self.loop.is_closed():
            coro.close()
            raise PSError("the client is closed")

    def submit(self, coro: Coroutine[object, object, T]) -> concurrent.futures.Future:
        """Start `coro` on the loop; its future can be waited on or cancelled from any thread."""
        self._check_open(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def start(self, coro: Coroutine[object, object, T]) -> "asyncio.Task[T]":
        """`coro` as a task on the loop; `result` waits for it, `cancel` ends it."""
        async def create() -> asyncio.Task:
            return asyncio.ensure_future(coro)

        return self.run(create())

    def result(self, task: "asyncio.Task[T]") -> T:
        async def wait() -> T:
            return await task

        return self.run(wait())

    def cancel(self, task: asyncio.Task) -> None:
        """Cancel the task and return once it has ended (its errors are dropped)."""
        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        self.run(stop())

    def close(self) -> None:
        """Cancel what is in flight, close the channels, stop the loop."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            # Streams first, while their readers still run: gRPC finishes with each call before
            # the loop goes (else its late completion events find the loop closed).
            await asyncio.gather(*(m.close() for m in self._mux if m is not None), return_exceptions=True)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ch in self._channels:
                await ch.close()

        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    # -- on the loop ---------------------------------------------------------------------------
    async def wait_connected(self, timeout: float) -> None:
        async def one(k: int) -> None:
            try:
                await asyncio.wait_for(self._channels[k].channel_ready(), timeout)
            except asyncio.TimeoutError as e:
                raise Unavailable(f"server {self.servers[k]} did not answer within {timeout:.0f}s") from e

        await asyncio.gather(*(one(k) for k in range(len(self.servers))))

    def negotiate(self, shard: int, offered: Sequence[str], host: str = "", local_socket: str = "",
                  data_port: int = 0, server_id: str = "") -> None:
        """After Register: the path this shard's calls take, from what it offers and `transport`
        (auto: the fastest both support: shm when the server runs on this host, then tcp, then
        stream; with shm, streams go over the server's `local_socket` when it names one; with
        tcp, over its `data_port`). Register itself always goes unary."""
        server = self.servers[shard]
        if self.transport in ("stream", "tcp", "shm") and "stream" not in offered:
            raise InvalidArgument(f"transport {self.transport!r} was asked for but server {server} offers only "
                                  f"{list(offered) or ['unary']}")
        if self.transport == "tcp" and not ("tcp" in offered and data_port):
            raise InvalidArgument(f"transport 'tcp' was asked for but server {server} offers no data port "
                                  "(--data-port -1): use auto or stream")
        co_located = "shm" in offered and bool(host) and host == shm.host_identity()
        if self.transport == "shm" and not co_located:
            raise InvalidArgument(
                f"transport 'shm' was asked for but server {server} "
                + ("does not offer it (--no-shm)" if "shm" not in offered else
                   "is not on this host (another machine, network or PID namespace, or user): use auto or stream"))
        stream = self.transport in ("auto", "stream", "tcp", "shm") and "stream" in offered
        if stream and self._mux[shard] is None:
            self._mux[shard] = Mux(self._stubs[shard], server, self.metadata, self._context, self.pool)
        elif not stream:
            self._mux[shard] = None
        mux = self._mux[shard]
        if mux is not None:
            want = co_located and self.transport in ("auto", "shm") and self.shm_regions is not None
            if not want:
                mux.shm = None
            elif mux.shm is None and not mux.shm_note:  # a lasting failure is not tried again
                mux.shm = (self.worker_id, self.shm_regions[shard])
            mux.local = local_socket if want and local_socket and local.SUPPORTED else None
            remote = self.transport == "tcp" or (self.transport == "auto" and mux.shm is None)
            mux.remote = data_port if remote and "tcp" in offered and data_port > 0 else None
            if mux.server_id != (server_id or None):  # another server (a restart): its memory is another's
                mux.forget_windows()
            mux.server_id = server_id or None
            mux.retry_now()
            mux.leave_grpc()
            mux.reoffer()

    def path(self, shard: int) -> str:
        """The transport this shard's calls take now (shm: once a stream has mapped a segment,
        whether the stream is gRPC's or the local socket's: `Mux.on_local`; tcp: once a stream
        is open on the data port)."""
        mux = self._mux[shard]
        return "unary" if mux is None else "shm" if mux.in_shm else "tcp" if mux.on_tcp else "stream"

    async def attempt(self, shard: int, method: str, request, timeout: float | None | object = DEFAULT,
                      answer_bytes: int = 0, place=None):
        """One try, errors mapped to PSError (`answer_bytes`, `place`: see Mux.request)."""
        t = self.rpc_timeout if timeout is DEFAULT else timeout
        mux = self._mux[shard]
        if mux is not None and method != "Register":
            return await mux.request(method, request, t, answer_bytes, place)
        try:
            return await getattr(self._stubs[shard], method)(request, timeout=t, metadata=self.metadata)
        except grpc.RpcError as e:
            raise mapped(e) from e

    async def call(self, shard: int, method: str, request, timeout: float | None | object = DEFAULT, *,
                   retry: bool = True, rejoin: Callable[[], Awaitable[None]] | None = None, waits: bool = False,
                   answer_bytes: int = 0, place=None):
        """One call with retries: while the server is unavailable or overloaded (backoff, up to
        retry_timeout); after `rejoin()` once if the server no longer knows this worker; and,
        for a call that `waits` (a pull waiting for other workers), again whenever its deadline
        passes, for as long as the server keeps the worker (it evicts stalled peers)."""
        start = time.monotonic()
        deadline = start + self.retry_timeout
        delay = 0.05
        while True:
            try:
                return await self.attempt(shard, method, request, timeout, answer_bytes, place)
            except (UnknownWorker, NotInitialized) as err:  # NotInitialized: restarted empty (rejoin re-inits)
                if rejoin is None:
                    raise
                log.warning("%s: %s; registering again", self.servers[shard], err)
                self.recoveries += 1
                await rejoin()
                rejoin = None
            except DeadlineExceeded:
                if not waits:
                    raise
                log.debug("%s: %s still waiting; asking again", self.servers[shard], method)
            except RETRIED as err:
                now = time.monotonic()
                if not retry or now + delay >= deadline:
                    raise
                # A server down (restarting?): say so now and then, once for all the calls waiting on it.
                if now - start >= WAITING_NOTICE and now - self._told[shard] >= WAITING_NOTICE:
                    self._told[shard] = now
                    log.warning("waiting for server %s (%s) for %.0fs; retrying until %.0fs (--retry-timeout): %s",
                                self.servers[shard], method, now - start, self.retry_timeout, err)
                if not isinstance(err, Overloaded):  # overload backs off briefly; reading again would add load
                    self.recoveries += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def gather_all(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Await all; raise the first error once every one has ended (none is left running)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)
