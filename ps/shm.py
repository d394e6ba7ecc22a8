"""Shared memory for the stream path when a worker and a server share a host (transport "shm").

The worker creates one segment per stream: an anonymous memory file (memfd: no name in any file
system, so nothing can leak in /dev/shm), every page reserved up front, sealed against shrinking
or growing. It offers the segment on the stream as its own `/proc/PID/fd/N`; the server opens
that (which only a process of the same user, in the same PID namespace, can), checks the seals,
maps it, and a probe shows both see each other's writes. The memory lives while either side
maps it and is reclaimed by the kernel when both have unmapped it: a side that dies unmaps it by
dying; the server unmaps when the stream ends or its worker leaves or is evicted. The seals mean
no one can shrink the file under the server's mapping (which would kill it with SIGBUS).

    header (64 bytes): magic, the worker's nonce, the server's nonce
    request region:    areas the worker writes requests into (the server applies a push
                       answered only once applied from there; it copies the rest out)
    answer region:     areas the worker reserves for answers (the server writes them; a pull
                       of slices that copy on write is answered by reference instead: Arena)

The worker owns both regions' allocation: an area is its request's alone until the request's
answer has arrived and been read, so nobody ever writes memory somebody else is reading (no torn
reads). An area whose request the worker withdrew (cancelled, timed out) is given back only when
the server says it is done with it; when the stream breaks, the segment goes with it.

Only processes of the same user on the same host share a segment; shared memory is not a
boundary between them.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import functools
import logging
import mmap
import os
import re
import secrets
import stat
import threading
import weakref

import numpy as np

from ps.errors import InvalidArgument, ShmUnavailable, Unavailable

log = logging.getLogger("ps.shm")

MAGIC = b"PS-SHM\x00\x02"
HEADER = 64  # magic (8), worker nonce (16), server nonce (16), reserved
_NONCE = 16
_WORKER_NONCE, _SERVER_NONCE = 8, 8 + _NONCE
NAME = re.compile(r"(\d{1,10}):(\d{1,10})")  # an offered segment: the worker's pid and its fd there
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL  # what a new memory file is sealed with
ALIGN = 64
MIN_BYTES = 64 << 10  # requests and answers smaller than this travel on the stream itself
INLINE_COPY = 1 << 20  # copies into or out of a segment up to this many bytes stay on the event loop
MAX_SEGMENT = 1 << 40  # what a server maps at most for one stream


@functools.cache
def host_identity() -> str:
    """What two processes must share to use shared memory: the boot, the network namespace (a
    worker in another one is on another host as far as ps is concerned, whatever else it
    shares), the PID namespace (the server opens the worker's segment through /proc) and the
    user. "" where there is no /proc to tell."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        net = os.stat("/proc/self/ns/net").st_ino
        pid = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return ""
    return f"boot={boot} net={net} pid={pid} uid={os.geteuid()}"


class Areas:
    """First-fit allocation of [start, end) of a segment, in ALIGN-byte steps (one event loop)."""

    def __init__(self, start: int, end: int):
        self.free: list[tuple[int, int]] = [(start, end)] if end > start else []
        self.used: dict[int, int] = {}

    def take(self, nbytes: int) -> int | None:
        """The offset of a fresh area of at least `nbytes`, or None when none is free."""
        n = -(-max(nbytes, 1) // ALIGN) * ALIGN
        for i, (s, e) in enumerate(self.free):
            if e - s >= n:
                self.free[i] = (s + n, e)
                if s + n == e:
                    del self.free[i]
                self.used[s] = n
                return s
        return None

    def give_back(self, offset: int) -> None:
        n = self.used.pop(offset)
        self.free.append((offset, offset + n))
        self.free.sort()
        merged: list[tuple[int, int]] = []
        for s, e in self.free:
            if merged and merged[-1][1] == s:
                merged[-1] = (merged[-1][0], e)
            else:
                merged.append((s, e))
        self.free = merged


RESIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def _open_theirs(name: str, flags: int, what: str) -> int:
    """The fd of another process's memory file named "PID:FD" (through /proc: only a process of
    the same user, in the same PID namespace, can); ShmUnavailable when it cannot be opened."""
    m = NAME.fullmatch(name)
    if not m:
        raise InvalidArgument(f"{what} name {name!r} must match {NAME.pattern} (a pid and an fd)")
    try:
        return os.open(f"/proc/{int(m[1])}/fd/{int(m[2])}", flags | os.O_CLOEXEC)
    except OSError as e:
        raise ShmUnavailable(f"{what} {name} cannot be opened here ({e.strerror}): its process is not on this "
                             "host, in this PID namespace or of this user, or its /proc entry is not readable "
                             "(a non-dumpable process)") from e


def _seals(fd: int) -> int:
    """The seals of a memory file of this user's; 0 for anything else (not sealed, another owner)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return 0
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return 0


def _check_range(offset: int, nbytes: int, size: int, what: str) -> None:
    if not (HEADER <= offset and nbytes >= 0 and offset + nbytes <= size):
        raise InvalidArgument(f"{what} [{offset}, {offset + nbytes}) lies outside the data [{HEADER}, {size})")


class Segment:
    """A mapped segment: the worker's (`create`) or the server's view of one (`attach`)."""

    def __init__(self, name: str, mm: mmap.mmap, fd: int = -1):
        self.name, self.mm, self.size, self.fd = name, mm, len(mm), fd
        self.bytes: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8)  # copies through numpy leave the GIL

    # -- the worker's side -----------------------------------------------------------------------
    @classmethod
    def create(cls, size: int) -> "Segment":
        """A new segment of `size` bytes, every page reserved now (no memory fails here, not with
        SIGBUS on first touch), sealed at that size, holding the magic and a fresh nonce. Its fd
        stays open until `release` (the server opens it through /proc while it is)."""
        fd, mm = _memory_file("segment", size, SEALS)
        mm[:HEADER] = MAGIC + secrets.token_bytes(_NONCE) + bytes(HEADER - len(MAGIC) - _NONCE)
        return cls(f"{os.getpid()}:{fd}", mm, fd)

    def release(self) -> None:
        """The worker's fd is no longer needed (the server has opened the segment, or will not)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    @property
    def worker_nonce(self) -> bytes:
        return self.mm[_WORKER_NONCE:_WORKER_NONCE + _NONCE]

    @property
    def server_nonce(self) -> bytes:
        return self.mm[_SERVER_NONCE:_SERVER_NONCE + _NONCE]

    # -- the server's side -----------------------------------------------------------------------
    @classmethod
    def attach(cls, name: str, nonce: bytes, max_size: int = MAX_SEGMENT) -> "Segment":
        """Map the worker's segment `name` ("PID:FD") after checking it is one: a memory file of
        this user's, sealed against shrinking, of a sane size, every page there, holding the magic
        and the worker's `nonce` (the probe that the two really share it); then write this side's
        nonce into it. InvalidArgument for what cannot be a segment, ShmUnavailable for one this
        server cannot reach (another host, PID namespace or user)."""
        fd = _open_theirs(name, os.O_RDWR, "segment")
        try:
            st = os.fstat(fd)
            if _seals(fd) & RESIZE_SEALS != RESIZE_SEALS:
                raise InvalidArgument(f"segment {name} is not a sealed memory file of this server's user: it must be "
                                      f"one, sealed against shrinking and growing (it is {stat.filemode(st.st_mode)}, "
                                      f"uid {st.st_uid}, seals {_seals(fd):#x})")
            if not HEADER < st.st_size <= max_size:
                raise InvalidArgument(f"segment {name} holds {st.st_size} bytes; a segment must hold more than "
                                      f"{HEADER} and at most {max_size}")
            try:  # every page there: a hole would be allocated on first touch, and could fail with SIGBUS
                os.posix_fallocate(fd, 0, st.st_size)
            except OSError as e:
                raise ShmUnavailable(f"segment {name}: no memory for its {st.st_size} bytes ({e.strerror})") from e
            try:
                mm = mmap.mmap(fd, st.st_size)
            except OSError as e:  # e.g. no address space or map count left, a write-sealed file
                raise ShmUnavailable(f"segment {name} cannot be mapped here ({e.strerror})") from e
        finally:
            os.close(fd)
        seg = cls(name, mm)
        if mm[:len(MAGIC)] != MAGIC or not secrets.compare_digest(seg.worker_nonce, bytes(nonce)):
            seg.close()
            raise ShmUnavailable(f"segment {name} does not hold the nonce the worker sent: it is not shared memory "
                                 "between the two")
        mm[_SERVER_NONCE:_SERVER_NONCE + _NONCE] = secrets.token_bytes(_NONCE)
        return seg

    # -- both ------------------------------------------------------------------------------------
    def check(self, offset: int, nbytes: int, what: str) -> None:
        _check_range(offset, nbytes, self.size, f"{what} in segment {self.name}:")

    def _mapped(self) -> np.ndarray:
        b = self.bytes
        if b is None:
            raise Unavailable(f"segment {self.name} was unmapped (its stream ended)")
        return b

    def read(self, offset: int, nbytes: int) -> memoryview:
        """A copy of the bytes: what the server serves (and may hold, a push's parts) is its own,
        whatever the worker writes there later."""
        self.check(offset, nbytes, "a request")
        return memoryview(self._mapped()[offset:offset + nbytes].copy())

    def borrow(self, offset: int, nbytes: int) -> memoryview:
        """The request's bytes where they lie, read-only (the server applies a push from them)."""
        self.check(offset, nbytes, "a request")
        return memoryview(self._mapped()[offset:offset + nbytes]).toreadonly()

    def view(self, offset: int, nbytes: int) -> memoryview:
        self.check(offset, nbytes, "an answer")
        return memoryview(self._mapped()[offset:offset + nbytes])

    def write(self, offset: int, chunks) -> int:
        """Write the buffers one after another from `offset`; returns the bytes written."""
        b, pos = self._mapped(), offset
        for c in chunks:
            src = np.frombuffer(memoryview(c).cast("B"), dtype=np.uint8)
            self.check(pos, src.nbytes, "a write")
            b[pos:pos + src.nbytes] = src
            pos += src.nbytes
        return pos - offset

    def close(self) -> None:
        """Unmap (when views of it are still alive, the mapping goes with the last of them)."""
        self.release()
        self.bytes = None
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()



# -- the server's published slices ---------------------------------------------------------------
# A server that offers shared memory keeps its slices (SGD and momentum: they copy on write) in
# memory files of its own that co-located workers map read-only, so a pull through shared memory
# is answered with where the slices lie (Pull with the RAW flag and a descriptor; ps.wire) and the
# worker copies them straight into its tensors: the server writes nothing for it. Until the worker
# says it has read them (a RELEASE), the slices it was told of are held as any reader's are: an
# update meanwhile goes to another buffer (ps.server.store), so nothing is read torn.

ARENA_MAGIC = b"PS-ARENA"
ARENA_FIRST = 1 << 20  # bytes of the first chunk; each next one as large as those before, up to:
ARENA_CHUNK = 64 << 20  # bytes of a chunk (a larger buffer gets a chunk of its own size)
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)  # Linux 5.1: no new writable mapping or write


def _memory_file(kind: str, size: int, seals: int) -> tuple[int, mmap.mmap]:
    """A new memory file of `size` bytes and this process's read-write mapping of it: every page
    reserved now (no memory fails here, not with SIGBUS on first touch), then sealed with `seals`
    (F_SEAL_FUTURE_WRITE only where the kernel has it, 5.1 on)."""
    try:
        fd = os.memfd_create(f"ps-{kind}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except (AttributeError, OSError) as e:
        raise ShmUnavailable(f"cannot create a shared-memory {kind}: {e}") from e
    try:
        os.ftruncate(fd, size)
        os.posix_fallocate(fd, 0, size)
        mm = mmap.mmap(fd, size)
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except OSError:
            if not seals & F_SEAL_FUTURE_WRITE:
                mm.close()
                raise
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals & ~F_SEAL_FUTURE_WRITE)
    except OSError as e:
        os.close(fd)
        raise ShmUnavailable(f"cannot reserve {size} bytes of shared memory: {e}") from e
    return fd, mm


class _Chunk:
    def __init__(self, size: int, server_id: bytes):
        # Sealed against writes and new writable mappings too: workers map it read-only.
        fd, self.mm = _memory_file("arena", size, SEALS | F_SEAL_FUTURE_WRITE)
        self.fd, self.size = fd, size
        self.name = f"{os.getpid()}:{fd}"
        self.tag = int.from_bytes(secrets.token_bytes(8), "little")  # tells it from a later chunk on the same fd
        self.mm[:HEADER] = arena_header(server_id, self.tag)
        self.view = memoryview(self.mm)
        self.base = np.frombuffer(self.mm, np.uint8).ctypes.data
        self.areas = Areas(HEADER, size)

    def close(self) -> None:
        """Unmap and close (no buffer of it is alive); workers that mapped it keep their mapping."""
        os.close(self.fd)
        with contextlib.suppress(BufferError, ValueError):
            self.view.release()
            self.mm.close()


def arena_header(server_id: bytes, tag: int) -> bytes:
    return (ARENA_MAGIC + server_id + tag.to_bytes(8, "little")).ljust(HEADER, b"\0")


class Arena:
    """(the server) Memory files its slices are allocated in (`empty`), which co-located workers
    open as this process's `/proc/PID/fd/N` read-only (the same user and PID namespace as the
    workers' segments need) and map (`Window`). Each chunk's header holds ARENA_MAGIC, the
    server's id (from Register) and the chunk's random tag, so a worker knows it mapped this
    server's memory, and this chunk, not an earlier one on the same fd. A buffer's space comes
    back when its last view is gone (at the next allocation); empty chunks beyond as many bytes
    as are in use are then closed (workers let go of their mappings of chunks no longer named:
    ps.worker.transport). Thread-safe."""

    def __init__(self, server_id: str, chunk_bytes: int = ARENA_CHUNK):
        self.server_id = server_id.encode()
        if len(ARENA_MAGIC) + len(self.server_id) + 8 > HEADER:
            raise ValueError(f"server id {server_id!r} does not fit a chunk's header")
        self.chunk_bytes = chunk_bytes
        self.chunks: list[_Chunk] = []
        # Buffers whose last view is gone: their finalizers only queue them (a finalizer may run
        # inside this very lock, from the cyclic GC), given back by the next `empty` or `close`.
        self._gone: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._warned = self._closed = False

    def empty(self, n: int) -> np.ndarray:
        """A float32 array of `n` elements in shared memory (contents undefined); a private one
        when no more shared memory can be had (logged once: such slices are answered by copy),
        and after `close`."""
        nbytes = 4 * n
        if nbytes == 0:
            return np.empty(0, np.float32)
        with self._lock:
            if self._closed:
                return np.empty(n, np.float32)
            self._give_back()
            for chunk in self.chunks:
                offset = chunk.areas.take(nbytes)
                if offset is not None:
                    break
            else:
                # Chunks double from 1 MiB to chunk_bytes (a small shard reserves little).
                grow = min(self.chunk_bytes, max(ARENA_FIRST, sum(c.size for c in self.chunks)))
                try:
                    chunk = _Chunk(max(grow, -(-(nbytes + HEADER) // ALIGN) * ALIGN), self.server_id)
                except ShmUnavailable as e:
                    if not self._warned:
                        self._warned = True
                        log.warning("no more shared memory for slices (%s): pulls of those are answered by copy", e)
                    return np.empty(n, np.float32)
                self.chunks.append(chunk)
                offset = chunk.areas.take(nbytes)
            self._trim()
        out = np.frombuffer(chunk.view[offset:offset + nbytes], np.float32)
        weakref.finalize(out, self._gone.append, (chunk, offset))  # (views of it, and tensors, keep it alive)
        return out

    def _give_back(self) -> None:
        while self._gone:  # (lock held)
            chunk, offset = self._gone.popleft()
            chunk.areas.give_back(offset)

    def _trim(self) -> None:
        """(lock held, after an allocation) Close empty chunks, the smallest first, while those
        kept would still hold more bytes than are in use (slack for the next copies on write,
        with no chunk made and closed every step)."""
        used = sum(n for c in self.chunks for n in c.areas.used.values())
        empty = sorted((c for c in self.chunks if not c.areas.used), key=lambda c: c.size)
        kept = sum(c.size for c in empty)
        for chunk in empty:
            if kept <= used:
                break
            kept -= chunk.size
            self.chunks.remove(chunk)
            chunk.close()

    def locate(self, view) -> tuple[_Chunk, int] | None:
        """(chunk, offset) where the bytes of `view` lie, or None when not in this arena (or
        empty: it lies nowhere)."""
        address, n = np.frombuffer(view, np.uint8).ctypes.data, memoryview(view).nbytes
        for chunk in list(self.chunks) if n else ():
            if chunk.base <= address and address + n <= chunk.base + chunk.size:
                return chunk, address - chunk.base
        return None

    def close(self) -> None:
        """The server stops: close the chunks (buffers still alive keep their mapping); from
        now on buffers are private memory."""
        with self._lock:
            self._closed = True
            self._gone.clear()
            chunks, self.chunks = self.chunks, []
        for chunk in chunks:
            chunk.close()


class Window:
    """(a worker) A server's arena chunk mapped read-only, after checking it is one: a memory
    file of this user's, sealed against shrinking and growing (no one can cut it under this
    mapping), of the size the server gave, holding ARENA_MAGIC and the server's id."""

    def __init__(self, name: str, size: int, tag: int, server_id: str):
        if not HEADER < size <= MAX_SEGMENT:
            raise InvalidArgument(f"shared-memory chunk {name!r} of {size} bytes: the size must lie in "
                                  f"({HEADER}, {MAX_SEGMENT}]")
        fd = _open_theirs(name, os.O_RDONLY, "the server's chunk")
        try:
            st, seals = os.fstat(fd), _seals(fd)
            if st.st_size != size or seals & RESIZE_SEALS != RESIZE_SEALS:
                raise ShmUnavailable(f"{name} is not a sealed memory file of {size} bytes of this user's (uid "
                                     f"{st.st_uid}, {st.st_size} bytes, seals {seals:#x})")
            self.mm = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        except OSError as e:
            raise ShmUnavailable(f"the server's chunk {name} cannot be mapped here ({e.strerror})") from e
        finally:
            os.close(fd)
        if self.mm[:HEADER] != arena_header(server_id.encode(), tag):
            self.mm.close()
            raise ShmUnavailable(f"{name} is not the server's shared memory chunk it named (its header names another)")
        self.name, self.size, self.tag = name, size, tag
        self.named = 0.0  # (the worker's) when an answer last named it
        self.bytes = np.frombuffer(self.mm, np.uint8)

    def view(self, offset: int, nbytes: int) -> memoryview:
        _check_range(offset, nbytes, self.size, f"published bytes in chunk {self.name}:")
        return memoryview(self.bytes[offset:offset + nbytes])

    def close(self) -> None:
        self.bytes = None
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()
