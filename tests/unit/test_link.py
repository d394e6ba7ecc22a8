"""ps.link's framed connections on a socket pair: frames of every size arrive whole and in order;
a split frame's tail goes where the router says; a withdrawn destination is written no more; a
frame whose sender stopped waiting is sent as it was; pooled buffers are used again only once
nothing refers to them."""

import asyncio
import socket

import numpy as np
import pytest

from ps import link, wire


def _pair():
    a, b = socket.socketpair()
    pool = link.Pool()
    return link.SocketConn(a, pool, limit=link.MAX_FRAME), link.SocketConn(b, pool, limit=link.MAX_FRAME), pool


def test_frames_of_every_size_arrive_whole_and_in_order():
    async def go():
        x, y, _ = _pair()
        sizes = [0, 1, 5, 1000, link.SCRATCH - 4, link.SCRATCH, 3 << 20, 17]
        frames = [bytes(np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)) for n in sizes]
        for f in frames:
            x.send(wire.Frame.of(f[: len(f) // 2], f[len(f) // 2:]))
        got = [bytes(await y.read()) for _ in frames]
        x.close()
        assert await y.read() is None  # a clean end
        return frames, got

    frames, got = asyncio.run(go())
    assert got == frames


def test_a_split_frames_tail_lands_where_the_router_says():
    async def go():
        x, y, _ = _pair()
        dest = [np.zeros(1000, np.uint8), np.zeros(3 << 20, np.uint8)]
        y.router = lambda head: [memoryview(d) for d in dest] if head == b"HEAD" else None
        tail = [np.full(1000, 7, np.uint8), np.full(3 << 20, 9, np.uint8)]
        x.send(wire.Frame(chunks=[b"HEAD", *tail], size=4 + 1000 + (3 << 20), head=4))
        x.send(wire.Frame(chunks=[b"OTHER", b"abc"], size=8, head=5))  # not routed: a pooled buffer
        first, second = await y.read(), await y.read()
        return dest, first, second

    dest, first, second = asyncio.run(go())
    assert (dest[0] == 7).all() and (dest[1] == 9).all()
    assert isinstance(first, link.Split) and first.head == b"HEAD"
    assert second.head == b"OTHER" and b"".join(bytes(t) for t in second.tail) == b"abc"


def test_a_connection_without_a_router_refuses_split_frames():
    async def go():
        x, y, _ = _pair()
        x.send(wire.Frame(chunks=[b"H", b"t"], size=2, head=1))
        with pytest.raises(ValueError, match="split frame"):
            await y.read()

    asyncio.run(go())


def test_a_diverted_destination_is_written_no_more():
    async def go():
        a, b = socket.socketpair()
        y = link.SocketConn(b, link.Pool(), limit=link.MAX_FRAME)
        dest = np.zeros(2 << 20, np.uint8)
        views = [memoryview(dest)]
        y.router = lambda head: views
        a.setblocking(False)
        loop = asyncio.get_running_loop()
        first = b"".join((link.LENGTH.pack((1 + len(dest)) | link.SPLIT), link.LENGTH.pack(1), b"H", b"\x01" * (1 << 20)))
        await loop.sock_sendall(a, first)
        while not (dest[: 1 << 20] == 1).all():  # half of it has come
            await asyncio.sleep(0.01)
        y.divert(views)  # its pull was withdrawn
        await loop.sock_sendall(a, b"\x02" * (1 << 20))
        frame = await y.read()
        a.close()
        return dest, frame

    dest, frame = asyncio.run(go())
    assert (dest[: 1 << 20] == 1).all() and (dest[1 << 20:] == 0).all()
    assert isinstance(frame, link.Split)


def test_a_queued_frame_whose_sender_stopped_waiting_is_sent_as_it_was():
    async def go():
        x, y, _ = _pair()
        big = np.full(8 << 20, 3, np.uint8)  # more than the socket takes at once
        x.send(wire.Frame.of(big), owner=41)
        x.own(41)  # its caller withdrew it: what is unsent is copied
        big[:] = 5  # and the caller's memory changes
        got = await y.read()
        return bytes(got)

    got = asyncio.run(go())
    assert got.count(b"\x05") == 0 and len(got) == 8 << 20


def test_pooled_buffers_are_used_again_only_once_nothing_refers_to_them():
    pool = link.Pool(keep=64 << 20)
    a = pool.take(3 << 20)
    address = np.frombuffer(a, np.uint8).ctypes.data
    b = pool.take(3 << 20)  # a is held: another
    assert np.frombuffer(b, np.uint8).ctypes.data != address
    del a
    c = pool.take((3 << 20) - 100)  # the same size class, free again
    assert np.frombuffer(c, np.uint8).ctypes.data == address
    view = c[10:20]
    del c
    d = pool.take(3 << 20)  # a slice of it still lives: not reused
    assert np.frombuffer(d, np.uint8).ctypes.data != address
    del view, d
