"""Raw frames on a server's stream path, over either of its channels: a gRPC Stream call, or
the local socket co-located workers use (ps.local)."""

import grpc

from ps import local, wire

VIAS = ("grpc", "local")


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
        call = await local.LocalCall.connect(server.local.name, f"Bearer {token}" if token else "")
        for f in frames:
            await call.write(f)
        while len(out) < len(frames) and (data := await call.read()) is not grpc.aio.EOF:
            out.append(wire.read_stream_answer(data))
        call.cancel()
    return [(rid, status, bytes(body)) for rid, status, body in out]
