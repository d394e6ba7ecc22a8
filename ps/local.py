"""The co-located path's own channel: when a worker and a server share a host (ps.shm's
identity), the stream path's frames (ps.wire) travel over a Unix socket instead of a gRPC
stream, each with a 4-byte length in front, while large request and answer bytes lie in the
shared-memory segment as before. A request then costs a socket write and read on each side
instead of gRPC's per-message machinery (its completion queue, its poller thread).

The socket lives in Linux's abstract namespace: it belongs to the network namespace the
server runs in (the host identity includes that namespace, so a worker elsewhere never tries
it) and leaves no file behind when the server dies. Its name is random, but abstract names are
listed in /proc/net/unix and anyone may bind a free one, so neither side trusts the name:
- the worker checks, before it sends anything, that the process at the other end is the
  server's own: its pid is in the name the server gave at Register, and its user is the
  worker's (SO_PEERCRED). A process that took the name of a server that died gets no token;
- the server takes a connection only from a process of its own user (SO_PEERCRED), as the
  shared-memory segments are only opened by it;
- the connection's first frame is a hello that carries the same bearer token the gRPC calls
  carry (`--auth-token`), compared in constant time; a wrong one is answered UNAUTHENTICATED;
- after the hello, every frame is served by the servicer's `Stream` handler, exactly as frames
  on the gRPC stream are: the same methods, checks, errors and answers. The connection ending
  (the worker closed it, or died) ends the stream at once: its requests are cancelled and its
  segment unmapped, as when a gRPC stream is cancelled. The server stops reading requests while
  the answers it has written wait to be read (the socket's buffer over its high-water mark).
Bytes on this socket never leave the host, so it carries no TLS (nor do the segments); the
server is authenticated by its pid and user instead of a certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import socket
import struct
import sys
from typing import AsyncIterator, Callable

import re

import grpc

from ps import wire
from ps.config import MAX_MESSAGE_BYTES
from ps.errors import Unauthenticated, Unavailable

log = logging.getLogger("ps.local")
LENGTH = struct.Struct("<I")
HELLO = b"PS-LOCAL\x01"  # a hello: this, then the token's bytes
WELCOME = b"PS-LOCAL-OK"
DENIED = b"PS-LOCAL-DENIED"
MAX_FRAME = MAX_MESSAGE_BYTES + 64  # a frame: the stream header (rid, code, shm descriptor) and the message
HELLO_TIMEOUT = 10.0  # seconds a new connection has to say hello
MAX_GREETING = 64  # connections waiting to say hello at once; more are closed at once
NAME = re.compile(r"\0ps-(\d{1,10})-[0-9a-f]{32}")
SUPPORTED = sys.platform.startswith("linux")  # abstract Unix sockets are a Linux feature


def new_name() -> str:
    """A fresh abstract socket name (the leading NUL puts it in the abstract namespace) that
    names this process, so a worker can tell the server from another process holding it."""
    return f"\0ps-{os.getpid()}-{secrets.token_hex(16)}"


def name_pid(name: str) -> int:
    """The server's pid in a socket name it handed out."""
    m = NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"not a ps local socket name: {name!r}")
    return int(m.group(1))


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> bytes | None:
    """The next frame, or None when the peer closed the connection between frames."""
    try:
        head = await reader.readexactly(LENGTH.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ConnectionError("the connection ended inside a frame's length") from None
        return None
    (n,) = LENGTH.unpack(head)
    if n > limit:
        raise ValueError(f"a frame of {n} bytes is larger than the limit ({limit})")
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise ConnectionError(f"the connection ended inside a frame of {n} bytes") from None


def write_frame(writer: asyncio.StreamWriter, data) -> None:
    """One frame: its length, then `data` (bytes-like, or a wire.Frame's pieces), joined into one
    write (one copy, one syscall)."""
    if isinstance(data, wire.Frame):
        n, chunks = data.size, data.chunks
    else:
        n, chunks = memoryview(data).nbytes, (data,)
    writer.write(b"".join((LENGTH.pack(n), *chunks)))


def _peer(writer: asyncio.StreamWriter) -> tuple[int, int]:
    """(pid, uid) of the process at the other end."""
    sock = writer.get_extra_info("socket")
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


class _Sink:
    """Where a connection's answers go: written to the socket as each is put, without a turn of
    the event loop (the connection reads no more requests while they wait to be read).
    put_nowait(None) ends it; get() returns None once it has ended."""

    def __init__(self, writer: asyncio.StreamWriter):
        self._writer, self._ended = writer, asyncio.Event()

    def put_nowait(self, answer) -> None:
        if answer is None:
            self._ended.set()
        elif not self._writer.is_closing():
            write_frame(self._writer, answer)

    async def get(self) -> None:
        await self._ended.wait()
        return None


class LocalServer:
    """A server's listening socket: each connection is one stream (`serve(requests, sink)`: an
    async generator that serves an async iterator of request frames, putting the answers into
    `sink`)."""

    def __init__(self, serve: Callable[[AsyncIterator[bytes], _Sink], AsyncIterator[bytes]], token: str = "",
                 on_refuse: Callable[[], None] = lambda: None):
        self.name = new_name()
        self._serve, self._on_refuse = serve, on_refuse
        self._expected = f"Bearer {token}".encode() if token else None
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task] = set()
        self._greeting = 0  # connections that have not said hello yet

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._connection, path=self.name, limit=1 << 20)

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)

    async def _hello(self, reader, writer) -> bool:
        if _peer(writer)[1] != os.geteuid():
            log.warning("refused a local connection from another user")
            self._on_refuse()
            return False
        if self._greeting >= MAX_GREETING:
            log.warning("refused a local connection: %d others have not said hello yet", self._greeting)
            return False
        self._greeting += 1
        try:
            hello = await asyncio.wait_for(read_frame(reader, 4096), HELLO_TIMEOUT)
        finally:
            self._greeting -= 1
        if hello is None or not hello.startswith(HELLO):
            log.warning("refused a local connection that did not say hello")
            return False
        if self._expected is not None and not hmac.compare_digest(hello[len(HELLO):], self._expected):
            self._on_refuse()
            log.warning("refused a local connection: missing or wrong auth token")
            write_frame(writer, DENIED)
            await writer.drain()
            return False
        write_frame(writer, WELCOME)
        await writer.drain()
        return True

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._conns.add(task)
        answers = None
        try:
            if not await self._hello(reader, writer):
                return

            sink = _Sink(writer)

            async def requests() -> AsyncIterator[bytes]:
                try:
                    while (frame := await read_frame(reader)) is not None:
                        yield frame
                        await writer.drain()  # answers not read yet: read no more requests meanwhile
                except (ConnectionResetError, BrokenPipeError) as e:  # the worker went away with data unread
                    log.debug("local connection ended: %s", e)
                except (ValueError, ConnectionError) as e:  # the framing is lost: end this connection
                    log.warning("local connection ended: %s", e)
                    writer.close()
                # The worker closed the connection or died (it never half-closes): the stream ends
                # now, its requests cancelled, not once they are served.
                sink.put_nowait(None)

            answers = self._serve(requests(), sink)
            async for _ in answers:  # (the sink writes each answer as it comes)
                pass
        except (ConnectionError, asyncio.TimeoutError, OSError, ValueError):
            pass  # the worker went away (its requests end with the connection)
        except asyncio.CancelledError:
            pass
        finally:
            if answers is not None:
                with contextlib.suppress(Exception):
                    await answers.aclose()
            writer.close()
            self._conns.discard(task)


class LocalCall:
    """A worker's connection to a server's local socket, with what ps.worker.transport's stream
    multiplexer uses of a gRPC stream call: write, read (grpc.aio.EOF at the end), cancel, code."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._reader, self._writer = reader, writer
        self._draining = asyncio.Lock()  # one drain at a time (older Pythons assert on concurrent ones)

    @classmethod
    async def connect(cls, name: str, authorization: str = "", timeout: float = 10.0) -> "LocalCall":
        """Connect, check that the other end is the server that gave `name` (its pid, this
        user), and say hello (`authorization`: the gRPC calls' header value, "Bearer <token>").
        Unauthenticated for a refused token; Unavailable or OSError when the socket is not there
        or held by another process (the server went away, or runs elsewhere)."""
        pid = name_pid(name)
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(name, limit=1 << 20), timeout)
        try:
            peer = _peer(writer)
            if peer != (pid, os.geteuid()):
                raise Unavailable(f"the local socket is held by process {peer[0]} of user {peer[1]}, not by the "
                                  f"server (process {pid} of user {os.geteuid()})")
            write_frame(writer, HELLO + authorization.encode())
            await writer.drain()
            answer = await asyncio.wait_for(read_frame(reader, 4096), timeout)
        except BaseException:
            writer.close()
            raise
        if answer == WELCOME:
            return cls(reader, writer)
        writer.close()
        if answer == DENIED:
            raise Unauthenticated("the server's local socket refused this worker's auth token")
        raise Unavailable("the server's local socket did not welcome this worker")

    def write_nowait(self, data) -> bool:
        """Queue a frame on the socket at once (frames keep their order); True when its buffer
        is over the high-water mark (await `drain` before more)."""
        if self._writer.is_closing() or self._reader.at_eof():
            raise Unavailable("the local connection is closed")
        try:
            write_frame(self._writer, data)
        except (ConnectionError, OSError) as e:
            raise Unavailable(f"the local connection broke ({e})") from e
        transport = self._writer.transport
        return transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]

    async def drain(self) -> None:
        """Wait until the socket's buffer is below its low-water mark (cancelling this loses
        nothing: what was queued stays queued)."""
        try:
            async with self._draining:
                await self._writer.drain()
        except (ConnectionError, OSError) as e:
            raise Unavailable(f"the local connection broke ({e})") from e

    async def write(self, data) -> None:
        if self.write_nowait(data):
            await self.drain()

    async def read(self):
        try:
            frame = await read_frame(self._reader)
        except (ValueError, ConnectionError, OSError):
            frame = None
        return grpc.aio.EOF if frame is None else frame

    def cancel(self) -> None:
        self._writer.close()

    async def code(self) -> None:
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
