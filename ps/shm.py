"""Shared memory for the stream path when a worker and a server share a host (transport "shm").

The worker creates one segment per stream (a file in /dev/shm, mode 0600, an unguessable name)
and offers it on the stream; the server maps it only after a probe shows both see each other's
writes, and both unlink the name at once: from then on no name exists, the memory lives while
either side maps it and is reclaimed by the kernel when both have unmapped it (a side that dies
unmaps it by dying; the server unmaps when the stream ends or its worker leaves or is evicted).

    header (64 bytes): magic, the worker's nonce, the server's nonce
    request region:    areas the worker writes requests into (the server copies them out)
    answer region:     areas the worker reserves for answers (the server writes them)

The worker owns both regions' allocation: an area is its request's alone until the request's
answer has arrived and been read, so nobody ever writes memory somebody else is reading (no torn
reads). An area whose request ended without an answer (cancelled, timed out, the stream broke)
is never used again: a server still serving it may write there late.

Only processes of the same user on the same host share a segment (0600, checked on both sides);
shared memory is not a boundary between them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import stat
import struct

import numpy as np

from ps.errors import InvalidArgument, ShmUnavailable, Unavailable

SHM_DIR = "/dev/shm"
MAGIC = b"PS-SHM\x00\x01"
HEADER = 64  # magic (8), worker nonce (16), server nonce (16), reserved
_NONCE = 16
_WORKER_NONCE, _SERVER_NONCE = 8, 8 + _NONCE
NAME = re.compile(r"ps-[0-9a-f]{32}")
ALIGN = 64
MIN_BYTES = 64 << 10  # requests and answers smaller than this travel on the stream itself
MAX_SEGMENT = 1 << 40  # what a server maps at most for one stream


def host_identity() -> str:
    """What two processes must share to use shared memory: the boot, the network namespace (a
    worker in another one is on another host as far as ps is concerned, whatever it can see of
    the file system), the /dev/shm file system, and the user. "" where there is no /dev/shm."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        net = os.stat("/proc/self/ns/net").st_ino
        shm = os.stat(SHM_DIR)
    except OSError:
        return ""
    if not stat.S_ISDIR(shm.st_mode):
        return ""
    return f"boot={boot} net={net} shm={shm.st_dev}:{shm.st_ino} uid={os.geteuid()}"


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

    def abandon(self, offset: int) -> None:
        """The area's request ended without an answer: it is never handed out again."""
        self.used.pop(offset, None)


class Segment:
    """A mapped segment: the worker's (`create`) or the server's view of one (`attach`)."""

    def __init__(self, name: str, mm: mmap.mmap):
        self.name, self.mm, self.size = name, mm, len(mm)
        self.bytes: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8)  # copies through numpy leave the GIL

    @property
    def path(self) -> str:
        return os.path.join(SHM_DIR, self.name)

    # -- the worker's side -----------------------------------------------------------------------
    @classmethod
    def create(cls, size: int) -> "Segment":
        """A new segment of `size` bytes, every page reserved now (fallocate: a /dev/shm too small
        fails here, not with SIGBUS on first touch), holding the magic and a fresh nonce."""
        name = f"ps-{secrets.token_hex(16)}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise ShmUnavailable(f"cannot create a shared-memory segment in {SHM_DIR}: {e}") from e
        try:
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise ShmUnavailable(f"cannot reserve {size} bytes of shared memory in {SHM_DIR}: {e}") from e
        finally:
            os.close(fd)
        mm[:HEADER] = MAGIC + secrets.token_bytes(_NONCE) + bytes(HEADER - len(MAGIC) - _NONCE)
        return cls(name, mm)

    @property
    def worker_nonce(self) -> bytes:
        return self.mm[_WORKER_NONCE:_WORKER_NONCE + _NONCE]

    @property
    def server_nonce(self) -> bytes:
        return self.mm[_SERVER_NONCE:_SERVER_NONCE + _NONCE]

    # -- the server's side -----------------------------------------------------------------------
    @classmethod
    def attach(cls, name: str, nonce: bytes, max_size: int = MAX_SEGMENT) -> "Segment":
        """Map the worker's segment `name` after checking it is one (a file of this user's, 0600,
        of a sane size, holding the magic and the worker's `nonce`: the probe that the two really
        share it), write this side's nonce into it and unlink its name. InvalidArgument if not."""
        if not NAME.fullmatch(name):
            raise InvalidArgument(f"segment name {name!r} must match {NAME.pattern}")
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise ShmUnavailable(f"segment {name} is not in this server's {SHM_DIR} ({e.strerror}): "
                                 "the worker is not on this host") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
                raise InvalidArgument(f"segment {name} must be a regular file of this server's user with mode 0600 "
                                      f"(it is mode {stat.filemode(st.st_mode)}, uid {st.st_uid})")
            if not HEADER < st.st_size <= max_size:
                raise InvalidArgument(f"segment {name} holds {st.st_size} bytes; a segment must hold more than "
                                      f"{HEADER} and at most {max_size}")
            mm = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        seg = cls(name, mm)
        if mm[:len(MAGIC)] != MAGIC or not secrets.compare_digest(seg.worker_nonce, bytes(nonce)):
            seg.close()
            raise ShmUnavailable(f"segment {name} does not hold the nonce the worker sent: it is not shared memory "
                                 "between the two")
        mm[_SERVER_NONCE:_SERVER_NONCE + _NONCE] = secrets.token_bytes(_NONCE)
        seg.unlink()
        return seg

    # -- both ------------------------------------------------------------------------------------
    def check(self, offset: int, nbytes: int, what: str) -> None:
        if not (HEADER <= offset and nbytes >= 0 and offset + nbytes <= self.size):
            raise InvalidArgument(f"{what} [{offset}, {offset + nbytes}) lies outside the segment's data "
                                  f"[{HEADER}, {self.size})")

    def _mapped(self) -> np.ndarray:
        b = self.bytes
        if b is None:
            raise Unavailable(f"segment {self.name} was unmapped (its stream ended)")
        return b

    def read(self, offset: int, nbytes: int) -> bytearray:
        """A copy of the bytes: what the server serves (and may hold, a push's parts) is its own,
        whatever the worker writes there later."""
        self.check(offset, nbytes, "a request")
        out = bytearray(nbytes)
        np.copyto(np.frombuffer(out, dtype=np.uint8), self._mapped()[offset:offset + nbytes])
        return out

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

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Unmap (when views of it are still alive, the mapping goes with the last of them)."""
        self.bytes = None
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()


SEGMENT_OFFER = struct.Struct("<H")  # the name's length; then the name, the worker's nonce, the worker id
