"""The co-located path's own channel: when a worker and a server share a host (ps.shm's
identity), the stream path's frames (ps.wire) travel over a Unix socket instead of a gRPC
stream (framed and served as ps.link says), while large request and answer bytes lie in the
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
- then the hello with the bearer token (ps.link), and the frames, served as on any stream.
Bytes on this socket never leave the host, so it carries no TLS (nor do the segments); the
server is authenticated by its pid and user instead of a certificate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import struct
import sys
from typing import AsyncIterator, Callable

from ps import buffers, link
from ps.errors import Unavailable

log = logging.getLogger("ps.local")
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


def _peer(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def _same_user(conn: link.Conn, on_refuse: Callable[[], None]) -> bool:
    if _peer(conn.socket)[1] != os.geteuid():
        log.warning("refused a local connection from another user")
        on_refuse()
        return False
    return True


class LocalServer(link.Listener):
    """A server's listening socket: each connection (from this user, with the token) is one
    stream, served by `serve(requests, sink)` (see ps.link.Listener)."""

    def __init__(self, serve: Callable[[AsyncIterator, object], AsyncIterator], token: str = "",
                 on_refuse: Callable[[], None] = lambda: None, pool: buffers.Pool | None = None, server_id: str = ""):
        super().__init__(serve, token, on_refuse, admit=lambda conn: _same_user(conn, on_refuse), pool=pool,
                         server_id=server_id)
        self.name = new_name()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.name)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        task = asyncio.ensure_future(self.accept_loop(sock))
        self.serving(task.cancel)


async def connect(name: str, authorization: str = "", timeout: float = 10.0, pool: buffers.Pool | None = None,
                  server_id: str | None = None) -> link.Call:
    """Connect, check that the other end is the server that gave `name` (its pid, this user),
    and say hello (`authorization`: the gRPC calls' header value, "Bearer <token>") once the
    server's greeting names `server_id` (None: any); large frames are received into buffers of
    `pool`.
    Unauthenticated for a refused token; Unavailable or OSError when the socket is not there or
    held by another process (the server went away, or runs elsewhere)."""
    pid = name_pid(name)
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, name), timeout)
        peer = _peer(sock)
        if peer != (pid, os.geteuid()):
            raise Unavailable(f"the local socket is held by process {peer[0]} of user {peer[1]}, not by the "
                              f"server (process {pid} of user {os.geteuid()})")
    except BaseException:
        sock.close()
        raise
    return await link.greeted(link.SocketConn(sock, pool or buffers.Pool()), authorization, timeout, "local",
                              server_id)
