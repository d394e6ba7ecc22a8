"""The data port: the stream path's frames (ps.link) on a TCP connection of their own, for
workers that do not share the server's host (transport "tcp"; "auto" takes it there).

gRPC stays the control plane: a worker registers over gRPC, learns the data port from the
answer (`RegisterResponse.data_port`, on the host it reached the server at) and opens one
connection per server. What a gRPC stream gives, this connection gives too:
- the same server: its greeting names the id it gave at Register, checked before the worker
  sends anything (a port forwarded elsewhere, another shard at the same address get nothing);
- the same token: the hello carries the bearer token the gRPC calls carry (ps.link);
- the same TLS: a server that serves TLS serves it on the data port with the same certificate,
  key and CA (mutual TLS when it has a CA), and the worker verifies it as its gRPC channel
  does (the CA, the host name it dialled);
- a dead peer found: TCP keepalive probes an idle connection after 10 s (every 5 s, twice),
  and data unacknowledged for 20 s ends it (TCP_USER_TIMEOUT), like gRPC's keepalive pings.
A worker that cannot reach the port (a firewall, a proxy in between) stays on the gRPC stream.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import AsyncIterator, Callable

from ps import buffers, link

log = logging.getLogger("ps.tcp")
KEEPALIVE = ((socket.SOL_SOCKET, "SO_KEEPALIVE", 1), (socket.IPPROTO_TCP, "TCP_KEEPIDLE", 10),
             (socket.IPPROTO_TCP, "TCP_KEEPINTVL", 5), (socket.IPPROTO_TCP, "TCP_KEEPCNT", 2),
             (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT", 20_000))


def tune(sock) -> None:
    """No Nagle delay (small frames go at once) and dead peers found (see the module doc)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for level, name, value in KEEPALIVE:
        if hasattr(socket, name):  # (Linux has them all)
            sock.setsockopt(level, getattr(socket, name), value)


def host_of(address: str) -> str:
    """The host part of "host:port" ("[::1]:5000" -> "::1")."""
    return address.rpartition(":")[0].strip("[]")


def _listeners(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (as gRPC binds), one port number."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr[:1] + (port,) + tuple(sockaddr[2:]))
            sock.listen(512)
            port = sock.getsockname()[1]  # port 0: the others take the number the first got
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class TcpServer(link.Listener):
    """A server's data port: each connection (TLS first when `context` is given, then the hello
    with the token) is one stream, served by `serve(requests, sink)` (see ps.link.Listener)."""

    def __init__(self, serve: Callable[[AsyncIterator, object], AsyncIterator], token: str = "",
                 on_refuse: Callable[[], None] = lambda: None, context: ssl.SSLContext | None = None,
                 pool: buffers.Pool | None = None, server_id: str = ""):
        super().__init__(serve, token, on_refuse, pool=pool, server_id=server_id)
        self.context, self.port = context, 0

    tune = staticmethod(tune)

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (port 0: a free one); returns the port."""
        socks = _listeners(host, port)
        self.port = socks[0].getsockname()[1]
        if self.context is None:
            tasks = [asyncio.ensure_future(self.accept_loop(s)) for s in socks]
            self.serving(lambda: [t.cancel() for t in tasks])
            return self.port

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                tune(writer.get_extra_info("socket"))
            except OSError as e:  # (reset already, say): that one only
                log.debug("a connection ended before it was served: %s", e)
                writer.close()
                return
            self.begin(link.stream_conn(reader, writer))

        server = await asyncio.start_server(connected, sock=None if len(socks) > 1 else socks[0],
                                            ssl=self.context, limit=1 << 20, ssl_handshake_timeout=link.HELLO_TIMEOUT,
                                            **({} if len(socks) == 1 else {"host": host, "port": self.port}))
        if len(socks) > 1:
            for s in socks:
                s.close()
        self.serving(server.close)
        return self.port


async def connect(host: str, port: int, authorization: str = "", context: ssl.SSLContext | None = None,
                  timeout: float = 10.0, pool: buffers.Pool | None = None, server_id: str | None = None
                  ) -> link.Call:
    """A connection to a server's data port, said hello on (`authorization`: "Bearer <token>"
    or "") once the server's greeting names `server_id` (None: any); with `context`, TLS first,
    the server's certificate checked for `host`; large frames are received into buffers of
    `pool`. Unauthenticated for a refused token; OSError, ssl.SSLError or Unavailable when it cannot be
    reached or does not welcome this worker."""
    if context is not None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host, limit=1 << 20), timeout)
        try:
            tune(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            raise
        conn: link.Conn = link.stream_conn(reader, writer)
    else:
        loop = asyncio.get_running_loop()
        error: OSError = OSError(f"{host} does not resolve")
        for family, kind, proto, _, sockaddr in await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await asyncio.wait_for(loop.sock_connect(sock, sockaddr), timeout)
            except (OSError, asyncio.TimeoutError) as e:
                sock.close()
                error = e if isinstance(e, OSError) else OSError(f"connecting to {host}:{port} timed out")
                continue
            break
        else:
            raise error
        try:
            tune(sock)
        except OSError:
            sock.close()
            raise
        conn = link.SocketConn(sock, pool or buffers.Pool())
    return await link.greeted(conn, authorization, timeout, "tcp", server_id)
