"""Framed connections: the stream path's frames (ps.wire) over a socket instead of a gRPC stream,
each frame a 4-byte little-endian length and that many bytes. Two channels use them: the Unix
socket a server opens for workers on its host (ps.local) and the TCP data port it opens for
workers elsewhere (ps.tcp).

A connection starts with a hello: HELLO and the bearer token the gRPC calls carry, compared in
constant time, answered WELCOME or DENIED (UNAUTHENTICATED, counted). After it, every frame is
served by the servicer's `Stream` handler, exactly as frames on the gRPC stream are: the same
methods, checks, errors and answers. A connection that ends (the worker closed it, or died)
ends its stream at once: its requests are cancelled. The server reads no more requests while
its answers wait to be sent. A broken framing (a length over the limit, a frame cut off) ends
the connection and changes nothing.

Two implementations of one connection:
- `SocketConn`, for plain sockets: the event loop's reader and writer callbacks drive a
  non-blocking socket. Frames go out by sendmsg straight from their pieces (a push's tensor
  memory is not copied in user space); a large frame comes in by recv_into straight into a
  buffer of its own size, small ones are cut out of one receive of many.
- `StreamConn`, for TLS: asyncio's streams (the ssl module encrypts from and decrypts into
  buffers of its own anyway).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import ipaddress
import itertools
import logging
import socket
import struct
from typing import AsyncIterator, Callable

import grpc

from ps import wire
from ps.buffers import Pool
from ps.config import MAX_MESSAGE_BYTES
from ps.errors import Unauthenticated, Unavailable

log = logging.getLogger("ps.link")
LENGTH = struct.Struct("<I")
SPLIT = 1 << 31  # in a frame's length: a split frame (a u32 head length follows; see SocketConn)
MAX_HEAD = (256 << 10) - 8  # a split frame's head is at most this (a pull answer's keys and shapes)
GREETING = b"PS-SERVER\x01"  # the server's first frame: this, then its id (RegisterResponse.server_id)
HELLO = b"PS-LOCAL\x01"  # a hello: this, then the token's bytes ("Bearer <token>", or nothing)
WELCOME = b"PS-LOCAL-OK"
DENIED = b"PS-LOCAL-DENIED"
MAX_FRAME = MAX_MESSAGE_BYTES + 64  # a frame: the stream header (rid, code, shm descriptor) and the message
MAX_HELLO = 4096
HELLO_TIMEOUT = 10.0  # seconds a new connection has to say hello
MAX_GREETING = 64  # connections waiting to say hello at once; more are closed at once
MAX_GREETING_FROM = 8  # of those, from one address
SCRATCH = MAX_HEAD + 8  # one receive of small frames; a larger frame gets a buffer of its own
IOV = 512  # pieces per sendmsg (under every system's IOV_MAX)
OUT_HIGH, OUT_LOW = 64 << 20, 16 << 20  # bytes queued to send: over HIGH a writer should drain, to LOW
IN_HIGH, IN_LOW = 64 << 20, 16 << 20  # bytes received, not yet read: over HIGH reading pauses, to LOW


def pieces(data) -> tuple[int, list]:
    """(bytes, pieces) of a frame's body: a wire.Frame's chunks, or one bytes-like object."""
    if isinstance(data, wire.Frame):
        return data.size, data.chunks
    return memoryview(data).nbytes, [data]


@dataclasses.dataclass
class Split:
    """A split frame as received: its head (bytes) and its tail, in the buffers the connection's
    router chose for it (or one of the pool's)."""

    head: bytes
    tail: list

    def __len__(self) -> int:
        return len(self.head) + sum(len(t) for t in self.tail)


class SocketConn:
    """A plain stream socket (TCP or Unix) carrying frames, driven by the event loop it was made
    on. `send` queues a frame and sends what the socket takes at once; `read` returns the next
    frame (bytes, a memoryview of a pooled buffer of its own, or a Split), None at a clean end,
    or raises the error the connection ended with (ConnectionError; ValueError for a frame over
    the limit, or a split frame where none is expected).

    A split frame (SPLIT in its length, then a u32 head length) lets the receiver choose where
    its tail goes once it has read the head: `router(head)` returns the buffers (their lengths
    adding up to the tail's) or None (a pooled buffer). Without a router, split frames are
    refused. It is how a pull's answer lands straight in the tensors it was asked for."""

    def __init__(self, sock: socket.socket, pool: Pool, limit: int = MAX_HELLO,
                 router: Callable[[bytes], list | None] | None = None):
        sock.setblocking(False)
        self.socket, self._fd, self.limit, self._pool = sock, sock.fileno(), limit, pool
        self.router = router
        self._loop = asyncio.get_running_loop()
        self._scratch = memoryview(bytearray(SCRATCH))
        self._have = 0  # bytes at the start of _scratch not yet cut into frames
        self._dest: list[memoryview] = []  # where the rest of a large frame goes, in order
        self._at = 0  # index in _dest being filled
        self._got = 0  # bytes in _dest[_at]
        self._frame = None  # what to deliver once _dest is full
        self._frames: collections.deque = collections.deque()
        self._queued = 0  # bytes in _frames
        self._waiter: asyncio.Future | None = None
        self._reading = True
        self._end: BaseException | None = None  # why no more frames come (EOFError: a clean end)
        self._out: collections.deque = collections.deque()  # [piece, owner] not yet sent
        self._unsent = 0
        self._writing = False
        self._drainers: list[asyncio.Future] = []
        self.closed = False
        self._loop.add_reader(self._fd, self._on_readable)

    # -- receiving -------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            for _ in range(64):  # bounded: other connections get their turn
                if self._dest:
                    view = self._dest[self._at]
                    n = self.socket.recv_into(view[self._got:])
                    if n == 0:
                        raise ConnectionError("the connection ended inside a frame")
                    self._got += n
                    self._advance()
                else:
                    n = self.socket.recv_into(self._scratch[self._have:])
                    if n == 0:
                        if self._have:
                            raise ConnectionError("the connection ended inside a frame")
                        self._finish(EOFError())
                        return
                    self._have += n
                    self._cut()
                if not self._reading:
                    return
        except (BlockingIOError, InterruptedError):
            pass
        except (ConnectionError, OSError, ValueError) as e:
            self._finish(e)

    def _advance(self) -> None:
        """Past the buffers of _dest that are full; the frame is delivered once all are."""
        while self._at < len(self._dest) and self._got == len(self._dest[self._at]):
            self._at, self._got = self._at + 1, 0
        if self._at == len(self._dest):
            frame, self._frame, self._dest, self._at = self._frame, None, [], 0
            self._deliver(frame)

    def _receive_into(self, dest: list, frame, have: memoryview) -> None:
        """The rest of a frame goes into `dest`, in order (`have`: what of it is in the scratch
        already, at most all of it); it is delivered once they are full."""
        self._dest, self._frame, self._at, self._got = [d for d in dest if len(d)], frame, 0, 0
        pos = 0
        while pos < len(have):
            view = self._dest[self._at]
            n = min(len(view) - self._got, len(have) - pos)
            view[self._got:self._got + n] = have[pos:pos + n]
            pos, self._got = pos + n, self._got + n
            if self._got == len(view):
                self._at, self._got = self._at + 1, 0
        self._advance()

    def _cut(self) -> None:
        """Frames out of the scratch buffer: whole small ones copied out; a large one (or a split
        frame's tail) is received straight into buffers of its own, its start moved there."""
        scratch, pos, have = self._scratch, 0, self._have
        while have - pos >= LENGTH.size and not self._dest:
            (word,) = LENGTH.unpack_from(scratch, pos)
            n, split = word & ~SPLIT, bool(word & SPLIT)
            if n > self.limit:
                raise ValueError(f"a frame of {n} bytes is larger than the limit ({self.limit})")
            if split:
                if self.router is None:
                    raise ValueError("a split frame where none is expected")
                if have - pos < 2 * LENGTH.size:
                    break
                (h,) = LENGTH.unpack_from(scratch, pos + LENGTH.size)
                if h > min(n, MAX_HEAD):
                    raise ValueError(f"a split frame's head of {h} bytes is over its frame ({n}) or {MAX_HEAD}")
                start = pos + 2 * LENGTH.size
                if have - start < h:
                    break
                head = bytes(scratch[start:start + h])
                dest = self._route(head, n - h)
                pos = min(have, start + n)
                self._receive_into(dest, Split(head, dest), scratch[start + h:pos])
                continue
            start = pos + LENGTH.size
            if have - start >= n:
                self._deliver(bytes(scratch[start:start + n]))
                pos = start + n
            elif LENGTH.size + n > len(scratch):
                body = self._pool.take(n)
                self._receive_into([body], body, scratch[start:have])
                pos = have
            else:
                break
        if pos:
            scratch[:have - pos] = scratch[pos:have]
            self._have = have - pos

    def divert(self, views: list) -> None:
        """Buffers a router gave are no longer to be written (their pull was withdrawn): what of
        them the frame being received has not filled yet goes to pooled buffers instead."""
        for i in range(self._at, len(self._dest)):
            if any(self._dest[i] is v for v in views):
                self._dest[i] = self._pool.take(len(self._dest[i]))

    def _route(self, head: bytes, n: int) -> list:
        """Where a split frame's tail of `n` bytes goes: the router's buffers, or a pooled one."""
        try:
            dest = self.router(head)
        except Exception:  # noqa: BLE001 - a router that fails leaves the tail to the pool
            log.exception("routing a split frame failed")
            dest = None
        if dest is None or sum(len(d) for d in dest) != n:
            dest = [self._pool.take(n)]
        return dest

    def _deliver(self, frame) -> None:
        self._frames.append(frame)
        self._queued += len(frame)
        if self._queued > IN_HIGH and self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        self._wake()

    def _wake(self) -> None:
        w, self._waiter = self._waiter, None
        if w is not None and not w.done():
            w.set_result(None)

    async def read(self):
        while not self._frames:
            if self._end is not None:
                if isinstance(self._end, EOFError):
                    return None
                raise self._end
            self._waiter = self._loop.create_future()
            await self._waiter
        frame = self._frames.popleft()
        self._queued -= len(frame)
        if not self._reading and self._queued <= IN_LOW and not self.closed:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)
        return frame

    # -- sending ---------------------------------------------------------------------------------
    def send(self, data, owner=None) -> bool:
        """Queue one frame (bytes-like, or a wire.Frame whose pieces are sent as they are: they
        must not change until sent, or until `own(owner)`; a Frame with a `head` goes as a
        split frame); True when over the high-water mark (await `drain` before more)."""
        if self.closed:
            raise ConnectionError("the connection is closed")
        n, chunks = pieces(data)
        if n > MAX_FRAME:
            raise ValueError(f"a frame of {n} bytes is larger than the limit ({MAX_FRAME})")
        head = getattr(data, "head", 0)
        self._out.append([LENGTH.pack(n | SPLIT) + LENGTH.pack(head) if head else LENGTH.pack(n), owner])
        for c in chunks:
            view = memoryview(c).cast("B")
            if view.nbytes:
                self._out.append([view, owner])
        self._unsent += LENGTH.size * (2 if head else 1) + n
        if not self._writing:
            self._flush()
        return self._unsent > OUT_HIGH

    def own(self, owner) -> None:
        """Copy what is still queued of the frames sent with `owner` (their caller stops waiting
        and may change the memory they point into)."""
        for item in self._out:
            if owner is not None and item[1] == owner and not isinstance(item[0], bytes):
                item[0] = bytes(item[0])

    def _flush(self) -> None:
        try:
            while self._out:
                n = self.socket.sendmsg([item[0] for item in itertools.islice(self._out, IOV)])
                self._unsent -= n
                while n:
                    item = self._out[0]
                    size = len(item[0])
                    if n >= size:
                        n -= size
                        self._out.popleft()
                    else:
                        item[0] = memoryview(item[0])[n:]
                        n = 0
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._finish(e)
            return
        if self._out and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._flush)
        elif not self._out and self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)
        if self._unsent <= OUT_LOW:
            self._release(None)

    def _release(self, error: BaseException | None) -> None:
        drainers, self._drainers = self._drainers, []
        for fut in drainers:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(None)

    @property
    def over_high_water(self) -> bool:
        return self._unsent > OUT_HIGH

    async def drain(self) -> None:
        """Until what is queued is below the low-water mark (ConnectionError once it has ended)."""
        if self.closed:
            raise ConnectionError("the connection is closed")
        if self._unsent > OUT_LOW:
            fut = self._loop.create_future()
            self._drainers.append(fut)
            await fut

    # -- the end ---------------------------------------------------------------------------------
    def _finish(self, why: BaseException) -> None:
        if self._end is None:
            self._end = why
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._end is None:
            self._end = EOFError()
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._out.clear()
        self.socket.close()
        self._wake()
        self._release(ConnectionError("the connection is closed"))

    async def wait_closed(self) -> None:
        return None


class StreamConn:
    """The same connection over asyncio's streams (for TLS): each frame is joined and written."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int = MAX_HELLO):
        self._reader, self._writer, self.limit = reader, writer, limit
        self.socket = writer.get_extra_info("socket")
        self._draining = asyncio.Lock()  # one drain at a time (older Pythons assert on concurrent ones)

    @property
    def closed(self) -> bool:
        return self._writer.is_closing() or self._reader.at_eof()

    async def read(self):
        try:
            head = await self._reader.readexactly(LENGTH.size)
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise ConnectionError("the connection ended inside a frame's length") from None
            return None
        (n,) = LENGTH.unpack(head)
        if n > self.limit:
            raise ValueError(f"a frame of {n} bytes is larger than the limit ({self.limit})")
        try:
            return await self._reader.readexactly(n)
        except asyncio.IncompleteReadError:
            raise ConnectionError(f"the connection ended inside a frame of {n} bytes") from None

    def send(self, data, owner=None) -> bool:
        if self._writer.is_closing():
            raise ConnectionError("the connection is closed")
        n, chunks = pieces(data)
        self._writer.write(b"".join((LENGTH.pack(n), *chunks)))  # (copied: nothing is left to own)
        return self.over_high_water

    def own(self, owner) -> None:
        pass

    @property
    def over_high_water(self) -> bool:
        transport = self._writer.transport
        return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]

    async def drain(self) -> None:
        async with self._draining:
            await self._writer.drain()

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


Conn = SocketConn | StreamConn


def stream_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> StreamConn:
    writer.transport.set_write_buffer_limits(high=OUT_HIGH, low=OUT_LOW)
    return StreamConn(reader, writer)


class _Sink:
    """Where a connection's answers go: sent as each is put, without a turn of the event loop
    (the connection reads no more requests while they wait to be sent). put_nowait(None) ends
    it; get() returns None once it has ended."""

    def __init__(self, conn: Conn):
        self._conn, self._ended = conn, asyncio.Event()
        self.splits = isinstance(conn, SocketConn)  # split answers can be sent (not over TLS)

    def put_nowait(self, answer) -> None:
        if answer is None:
            self._ended.set()
        elif not self._conn.closed:
            with contextlib.suppress(ConnectionError, OSError):
                self._conn.send(answer)

    async def get(self) -> None:
        await self._ended.wait()
        return None


class Listener:
    """The serving side of a channel: each accepted connection (`admit(conn)` True, a hello with
    the token) is one stream, served by `serve(requests, sink)`, an async generator that serves
    an async iterator of request frames, putting the answers into `sink`."""

    def __init__(self, serve: Callable[[AsyncIterator, _Sink], AsyncIterator], token: str = "",
                 on_refuse: Callable[[], None] = lambda: None, admit: Callable[[Conn], bool] = lambda conn: True,
                 pool: Pool | None = None, server_id: str = ""):
        self._serve, self._on_refuse, self._admit = serve, on_refuse, admit
        self.pool = pool or Pool()
        self.server_id = server_id  # named in the greeting: the worker checks it before it says hello
        self._expected = f"Bearer {token}".encode() if token else None
        self._conns: set[asyncio.Task] = set()
        self._greeting: collections.Counter = collections.Counter()  # by address: not said hello yet
        self._stop: Callable[[], object] | None = None  # closes the listening socket
        self.listening = False

    def serving(self, stop: Callable[[], object]) -> None:
        self._stop, self.listening = stop, True

    async def accept_loop(self, sock: socket.socket) -> None:
        """Accept plain connections on a listening socket until stopped."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        try:
            while True:
                try:
                    conn, _ = await loop.sock_accept(sock)
                except OSError as e:  # (out of descriptors, say): keep listening
                    log.warning("accepting a connection failed: %s", e)
                    await asyncio.sleep(0.1)
                    continue
                try:
                    self.tune(conn)
                except OSError as e:  # (reset already, say): that one only
                    log.debug("a connection ended before it was served: %s", e)
                    conn.close()
                    continue
                self.begin(SocketConn(conn, self.pool))
        finally:
            sock.close()

    @staticmethod
    def tune(sock: socket.socket) -> None:
        """Socket options of one connection (ps.tcp sets TCP's)."""

    def begin(self, conn: Conn) -> None:
        """Serve one accepted connection."""
        task = asyncio.ensure_future(self._connection(conn))
        self._conns.add(task)
        task.add_done_callback(self._conns.discard)

    async def stop(self) -> None:
        self.listening = False
        if self._stop is not None:
            result = self._stop()
            if asyncio.iscoroutine(result):
                await result
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _hello(self, conn: Conn) -> bool:
        if not self._admit(conn):
            return False
        peer = _address(conn)
        if sum(self._greeting.values()) >= MAX_GREETING or (peer and self._greeting[peer] >= MAX_GREETING_FROM):
            log.warning("refused a connection from %s: %d others (%d from there) have not said hello yet",
                        peer or "this host", sum(self._greeting.values()), self._greeting[peer])
            return False
        self._greeting[peer] += 1
        try:
            conn.send(GREETING + self.server_id.encode())
            hello = await asyncio.wait_for(conn.read(), HELLO_TIMEOUT)
        finally:
            self._greeting[peer] -= 1
            if not self._greeting[peer]:
                del self._greeting[peer]
        if hello is None or not bytes(hello).startswith(HELLO):
            log.warning("refused a connection that did not say hello")
            return False
        if self._expected is not None and not hmac.compare_digest(bytes(hello)[len(HELLO):], self._expected):
            self._on_refuse()
            log.warning("refused a connection: missing or wrong auth token")
            conn.send(DENIED)
            await conn.drain()
            return False
        conn.send(WELCOME)
        await conn.drain()
        conn.limit = MAX_FRAME  # (until the hello, a frame is at most MAX_HELLO)
        return True

    async def _connection(self, conn: Conn) -> None:
        answers = None
        try:
            if not await self._hello(conn):
                return
            sink = _Sink(conn)

            async def requests() -> AsyncIterator:
                try:
                    while (frame := await conn.read()) is not None:
                        yield frame
                        if conn.over_high_water:  # answers not sent yet: read no more requests meanwhile
                            await conn.drain()
                except (ConnectionResetError, BrokenPipeError) as e:  # the worker went away with data unread
                    log.debug("connection ended: %s", e)
                except (ValueError, ConnectionError, OSError) as e:  # the framing is lost: end this connection
                    log.warning("connection ended: %s", e)
                    conn.close()
                # The worker closed the connection or died (it never half-closes): the stream ends
                # now, its requests cancelled, not once they are served.
                sink.put_nowait(None)

            answers = self._serve(requests(), sink)
            async for _ in answers:  # (the sink sends each answer as it comes)
                pass
        except (ConnectionError, asyncio.TimeoutError, OSError, ValueError):
            pass  # the worker went away (its requests end with the connection)
        except asyncio.CancelledError:
            pass
        finally:
            if answers is not None:
                with contextlib.suppress(Exception):
                    await answers.aclose()
            conn.close()


def _address(conn: Conn) -> str:
    """Where a TCP peer connects from: its IPv4 address, or its IPv6 /64 (one host's share);
    "" for a Unix socket (whose peers the listener's `admit` checks by user)."""
    try:
        peer = conn.socket.getpeername()
    except OSError:
        return "?"
    if not isinstance(peer, tuple):
        return ""
    if ":" in peer[0]:
        return str(ipaddress.ip_network(f"{peer[0].split('%')[0]}/64", strict=False))
    return peer[0]


async def greeted(conn: Conn, authorization: str, timeout: float, kind: str, server_id: str | None) -> "Call":
    """A worker's connection once the server welcomed it (`say_hello`); closed if it did not."""
    try:
        await say_hello(conn, authorization, timeout, server_id)
    except BaseException:
        conn.close()
        raise
    return Call(conn, kind)


async def _next(conn: Conn, timeout: float, what: str):
    """The server's next frame (None: it closed the connection); Unavailable past `timeout`."""
    try:
        return await asyncio.wait_for(conn.read(), timeout)
    except asyncio.TimeoutError:
        raise Unavailable(f"no {what} from the server within {timeout:.0f}s") from None
    except (ConnectionError, ValueError, OSError) as e:
        raise Unavailable(f"the server ended the connection before {what} ({e})") from e


async def say_hello(conn: Conn, authorization: str, timeout: float, server_id: str | None) -> None:
    """The worker's side of the hello (`authorization`: the gRPC calls' header value, "Bearer
    <token>"), once the server's greeting names `server_id` (the id it gave at Register; None:
    any): nothing, the token least of all, goes to another process that answers at the same
    address (another shard, a port forwarded elsewhere). Unauthenticated for a refused token,
    Unavailable for anything else."""
    greeting = await _next(conn, timeout, "its greeting")
    if greeting is None:
        raise Unavailable("the server closed the connection before its greeting (too many connections waiting to "
                          "say hello?)")
    greeting = bytes(greeting)
    if not greeting.startswith(GREETING):
        raise Unavailable("what answers there is not a ps server's socket")
    got = greeting[len(GREETING):]
    if server_id is not None and not hmac.compare_digest(got, server_id.encode()):
        raise Unavailable(f"what answers there is another server (id {got[:16]!r}...), not the one registered with")
    conn.send(HELLO + authorization.encode())
    await conn.drain()
    answer = await _next(conn, timeout, "its answer to the hello")
    if answer is not None and bytes(answer) == WELCOME:
        conn.limit = MAX_FRAME
        return
    if answer is not None and bytes(answer) == DENIED:
        raise Unauthenticated("the server refused this worker's auth token")
    raise Unavailable("the server did not welcome this worker")


class Call:
    """A worker's connection, with what ps.worker.transport's stream multiplexer uses of a gRPC
    stream call: write / write_nowait / drain, read (grpc.aio.EOF at the end), cancel, code.
    `splits`: whether answers may come as split frames (a plain socket: see SocketConn.router)."""

    def __init__(self, conn: Conn, kind: str):
        self.conn, self.kind = conn, kind  # kind: "local" or "tcp"
        self.splits = isinstance(conn, SocketConn)

    def write_nowait(self, data, owner=None) -> bool:
        """Queue a frame at once (frames keep their order); True when over the high-water mark
        (await `drain` before more). A Frame's pieces are sent from where they are: call
        `own(owner)` when their caller stops waiting before they are sent."""
        if self.conn.closed:
            raise Unavailable("the connection is closed")
        try:
            return self.conn.send(data, owner)
        except (ConnectionError, OSError) as e:
            raise Unavailable(f"the connection broke ({e})") from e

    def own(self, owner) -> None:
        self.conn.own(owner)

    async def drain(self) -> None:
        """Until the queued frames are below the low-water mark (cancelling this loses nothing)."""
        try:
            await self.conn.drain()
        except (ConnectionError, OSError) as e:
            raise Unavailable(f"the connection broke ({e})") from e

    async def write(self, data) -> None:
        if self.write_nowait(data):
            await self.drain()

    async def read(self):
        try:
            frame = await self.conn.read()
        except (ValueError, ConnectionError, OSError) as e:
            log.warning("the connection to the server ended: %s", e)
            frame = None
        return grpc.aio.EOF if frame is None else frame

    def cancel(self) -> None:
        self.conn.close()

    async def code(self) -> None:
        await self.conn.wait_closed()
