"""Raw frames on a server's stream path, over any of its channels: a gRPC Stream call, the
local socket co-located workers use (ps.local), or the data port (ps.tcp)."""

import socket
import struct

import grpc

from ps import local, tcp, wire

VIAS = ("grpc", "local", "tcp")


async def exchange(server, frames, via: str = "grpc", token: str = ""):
    """Send `frames` on one stream of `server` (a RunningServer), then end it: the answers
    (id, status, body) in the order they came. On the local socket, where ending the connection
    cancels what it asked, every frame must get one answer (they are awaited first)."""
    frames = [f.tobytes() if isinstance(f, wire.Frame) else f for f in frames]
    out = []
    if via == "grpc":
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        async with grpc.aio.insecure_channel(server.address) as channel:
            call = wire.Stub(channel).Stream(metadata=metadata)
            for f in frames:
                await call.write(f)
            await call.done_writing()
            while (data := await call.read()) is not grpc.aio.EOF:
                out.append(wire.read_stream_answer(data))
    else:
        authorization = f"Bearer {token}" if token else ""
        call = await (local.connect(server.local.name, authorization) if via == "local" else
                      tcp.connect("127.0.0.1", server.tcp.port, authorization))
        for f in frames:
            await call.write(f)
        while len(out) < len(frames) and (data := await call.read()) is not grpc.aio.EOF:
            out.append(wire.read_stream_answer(data))
        call.cancel()
    return [(rid, status, bytes(body)) for rid, status, body in out]


def frame(data: bytes) -> bytes:
    """One frame of a socket channel (ps.link): its 4-byte length, then `data`."""
    return struct.pack("<I", len(data)) + data


def read_all(s: socket.socket) -> bytes:
    """Everything until the other end closes."""
    out = b""
    while chunk := s.recv(1 << 16):
        out += chunk
    return out


def raw_socket(server, via: str) -> socket.socket:
    """A plain socket to one of `server`'s socket channels ("local" or "tcp"), nothing said yet."""
    if via == "local":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(server.local.name)
        return s
    return socket.create_connection(("127.0.0.1", server.tcp.port), timeout=10)


def read_frame(s: socket.socket) -> bytes:
    """One frame's bytes (its length read first)."""
    def exactly(n: int) -> bytes:
        out = b""
        while len(out) < n and (chunk := s.recv(n - len(out))):
            out += chunk
        return out

    (n,) = struct.unpack("<I", exactly(4))
    return exactly(n)
