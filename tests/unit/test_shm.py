"""ps.shm: the areas of a segment, and the checks a server makes before it maps one."""

import os

import pytest

from ps import shm
from ps.errors import InvalidArgument, ShmUnavailable


def test_areas_are_handed_out_apart_merged_when_given_back_and_kept_ones_never_return():
    a = shm.Areas(64, 64 + 10 * shm.ALIGN)
    x, y, z = a.take(1), a.take(shm.ALIGN + 1), a.take(3 * shm.ALIGN)
    assert (x, y, z) == (64, 64 + shm.ALIGN, 64 + 3 * shm.ALIGN)
    assert a.take(5 * shm.ALIGN) is None  # 4 left
    a.give_back(x)
    a.give_back(y)
    assert a.free[0] == (64, 64 + 3 * shm.ALIGN)  # merged
    # z is kept (its request was withdrawn and the server has not answered yet)
    assert a.take(4 * shm.ALIGN) == 64 + 6 * shm.ALIGN  # z's area is not among the free ones
    assert a.take(3 * shm.ALIGN) == 64
    assert a.take(1) is None


def test_a_server_maps_only_a_sealed_memory_file_holding_the_workers_nonce(tmp_path):
    seg = shm.Segment.create(1 << 16)
    try:
        with pytest.raises(OSError):  # sealed: nobody can shrink it under a mapping
            os.ftruncate(seg.fd, 10)
        with pytest.raises(ShmUnavailable, match="nonce"):
            shm.Segment.attach(seg.name, b"\0" * 16)
        with pytest.raises(InvalidArgument, match="at most"):
            shm.Segment.attach(seg.name, seg.worker_nonce, max_size=1 << 10)
        mapped = shm.Segment.attach(seg.name, seg.worker_nonce)
        assert mapped.server_nonce == seg.server_nonce != bytes(16)  # each sees the other's writes
        mapped.write(4096, [b"abc", memoryview(b"def")])
        assert bytes(seg.view(4096, 6)) == b"abcdef" and seg.read(4096, 3) == b"abc"
        with pytest.raises(InvalidArgument, match="outside"):
            mapped.read(seg.size - 2, 4)
        mapped.close()
        seg.release()
        with pytest.raises(ShmUnavailable, match="cannot be opened"):  # its fd is closed: gone from /proc
            shm.Segment.attach(seg.name, seg.worker_nonce)
    finally:
        seg.close()
    unsealed = os.memfd_create("x")
    plain = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(unsealed, 1 << 16)
        os.ftruncate(plain, 1 << 16)
        for fd, rule in ((unsealed, "sealed against shrinking"), (plain, "not a sealed memory file")):
            with pytest.raises(InvalidArgument, match=rule):
                shm.Segment.attach(f"{os.getpid()}:{fd}", bytes(16))
    finally:
        os.close(unsealed)
        os.close(plain)


@pytest.mark.parametrize("name", ["../etc/passwd", "1:2:3", "/proc/1/fd/2", "x" * 40, "12345678901:1"])
def test_a_name_that_is_not_a_segments_is_refused_before_anything_is_opened(name):
    with pytest.raises(InvalidArgument, match="must match"):
        shm.Segment.attach(name, bytes(16))


def test_an_offer_of_a_process_that_is_not_there_is_not_shared():
    with pytest.raises(ShmUnavailable):
        shm.Segment.attach("999999999:3", bytes(16))


def test_the_host_identity_names_the_network_and_pid_namespaces():
    ident = shm.host_identity()
    assert f"net={os.stat('/proc/self/ns/net').st_ino}" in ident and "pid=" in ident and "uid=" in ident


def test_an_arena_hands_out_buffers_in_its_chunks_and_takes_their_space_back_when_they_are_gone():
    import gc

    import numpy as np
    import torch

    arena = shm.Arena("server-a")
    x = arena.empty(1000)
    t = torch.from_numpy(x)  # a tensor keeps its buffer
    x[:] = 1.5
    chunk, offset = arena.locate(memoryview(x))
    assert chunk is arena.chunks[0] and chunk.size == shm.ARENA_FIRST
    assert arena.locate(memoryview(x[:0])) is None  # no bytes lie anywhere
    big = arena.empty(shm.ARENA_FIRST // 4)  # does not fit the first chunk: a chunk of its own size
    assert len(arena.chunks) == 2 and arena.chunks[1].size >= shm.ARENA_FIRST + shm.HEADER
    assert arena.locate(memoryview(np.empty(4, np.float32))) is None  # not in the arena
    window = shm.Window(chunk.name, chunk.size, chunk.tag, "server-a")
    assert np.array_equal(np.frombuffer(window.view(offset, 4000), np.float32), np.full(1000, 1.5, np.float32))
    with pytest.raises(InvalidArgument, match="outside"):
        window.view(0, 8)  # the header
    with pytest.raises(ShmUnavailable, match="names another"):
        shm.Window(chunk.name, chunk.size, chunk.tag, "server-b")
    with pytest.raises(ShmUnavailable, match="names another"):  # another chunk that had the same fd
        shm.Window(chunk.name, chunk.size, chunk.tag ^ 1, "server-a")
    with pytest.raises(ShmUnavailable, match="sealed memory file of"):
        shm.Window(chunk.name, chunk.size + 64, chunk.tag, "server-a")
    seg = shm.Segment.create(1 << 16)  # a sealed memory file of this user's, but a segment: its header says so
    try:
        with pytest.raises(ShmUnavailable):
            shm.Window(seg.name, seg.size, 0, "server-a")
    finally:
        seg.close()
    window.close()
    del x
    gc.collect()
    arena.empty(1)  # (space comes back at the next allocation)
    assert len(arena.chunks[0].areas.used) == 2  # the tensor still holds its buffer
    first, second = arena.chunks
    del t, big
    gc.collect()
    y = arena.empty(1)
    # The empty chunk is closed: it holds more bytes than the buffers in use.
    assert arena.chunks == [first] and arena.locate(memoryview(y))[0] is first
    with pytest.raises(OSError):
        os.fstat(second.fd)
    arena.close()
    assert arena.chunks == [] and arena.locate(memoryview(y)) is None
    assert arena.empty(10).base is None  # after close: private memory


def test_buffers_freed_by_the_cyclic_gc_inside_an_allocation_never_share_memory():
    """A buffer's finalizer may run inside Arena.empty (the cyclic GC, on the same thread, at any
    point of it: each GC threshold in turn): its space is queued, not given back under the
    allocation's feet (which once handed out an area still listed free)."""
    import gc

    import numpy as np

    class Cycle:
        pass

    for threshold in range(1, 30):
        arena = shm.Arena("server-a")
        kept = [arena.empty(1000) for _ in range(3)]
        extra = arena.empty(1000)
        gc.collect()
        c = Cycle()
        c.me, c.buf = c, kept.pop(0)  # only the cyclic GC frees it
        del c
        gc.set_threshold(threshold, 1000, 1000)
        try:
            kept.append(arena.empty(2000))
        finally:
            gc.set_threshold(700, 10, 10)
        gc.collect()
        for chunk in arena.chunks:
            assert not any(o < e and s < o + n for o, n in chunk.areas.used.items() for s, e in chunk.areas.free)
        del extra
        kept.append(arena.empty(2000))
        spans = sorted((np.frombuffer(b, np.uint8).ctypes.data, b.nbytes) for b in kept)
        assert all(s1 + n1 <= s2 for (s1, n1), (s2, _) in zip(spans, spans[1:])), threshold
