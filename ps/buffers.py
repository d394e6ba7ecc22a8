"""Buffers lent and reused, without reading Python's reference counts (which differ between
versions): `Leases` counts the views handed out of a buffer until each is gone, `Pool` reuses
buffers of large frames once no lease holds them. Used by ps.link (frames received, answers
sent) and the server's store (slices being sent)."""

from __future__ import annotations

import collections
import threading
import warnings
import weakref

import numpy as np
import torch

PARALLEL_COPY = 1 << 20  # byte copies from this size on go through torch, spread over its threads

# torch.frombuffer warns about every read-only buffer; copy_bytes only reads its source.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def copy_bytes(dst: np.ndarray, src) -> None:
    """dst[:] = src, byte for byte (dst a writable uint8 array, src any buffer of its size). A
    large copy goes through torch, which spreads it over its intra-op threads: numpy's copy takes
    one core (100 MiB in 13-15 ms on a 2-core machine, torch's in 8-9); both leave the GIL."""
    if dst.nbytes < PARALLEL_COPY:
        dst[:] = np.frombuffer(src, np.uint8)
        return
    torch.from_numpy(dst).copy_(torch.frombuffer(src, dtype=torch.uint8))


class Leases:
    """Which buffers are held by views handed out: `lend(buffer)` returns a view of it as a
    fresh array object whose death (the last memoryview, tensor or array made from it gone)
    gives the lease back, counted per buffer. Explicit, not read from reference counts (those
    differ between Python versions). Thread-safe: a lease may end on any thread."""

    def __init__(self):
        self._held: dict[int, int] = {}
        # Leases that ended: queued by the views' finalizers (which may run anywhere, the cyclic
        # GC's inside this very lock included), counted off by the next lend or held.
        self._ended: collections.deque = collections.deque()
        self._lock = threading.Lock()

    def lend(self, buffer: np.ndarray, n: int | None = None) -> memoryview:
        """A memoryview of `buffer` (its first `n` bytes): held until it, and every memoryview,
        array or tensor made from it, is gone. (A memoryview, not the array: numpy slices of an
        array point at the array that owns the memory, skipping the view the lease watches.)"""
        # Views of the buffer keep it alive (its id stays its own) when it owns its memory or was
        # made straight from another object's buffer (ps.shm.Arena's); not a view of an array
        # (numpy points views of that at the array that owns the memory).
        assert buffer.base is None or not isinstance(buffer.base, np.ndarray), "lend buffers that own their memory"
        view = buffer[:n] if n is not None else buffer.view()
        key = id(buffer)
        with self._lock:
            self._settle()
            self._held[key] = self._held.get(key, 0) + 1
        weakref.finalize(view, self._ended.append, key)
        return memoryview(view)

    def _settle(self) -> None:
        while self._ended:
            key = self._ended.popleft()
            left = self._held.pop(key) - 1
            if left:
                self._held[key] = left

    def held(self, buffer: np.ndarray) -> bool:
        with self._lock:
            self._settle()
            return id(buffer) in self._held


class Pool:
    """Buffers for large frames, used again once nothing refers to them (a fresh buffer would
    cost a page fault for each of its pages, every frame). Sizes are rounded up to a class (a
    power of two up to 1 MiB, then whole MiB); at most `keep` bytes are held, beyond that
    buffers are fresh and freed as usual. A buffer handed out is taken until every memoryview,
    tensor or array made from it is gone (Leases). Thread-safe."""

    def __init__(self, keep: int = 512 << 20):
        self._held: dict[int, list[np.ndarray]] = {}
        self._bytes, self._keep = 0, keep
        self._leases = Leases()
        self._lock = threading.Lock()

    @staticmethod
    def _size(n: int) -> int:
        return max(1 << (n - 1).bit_length(), 1 << 16) if n <= 1 << 20 else -(-n >> 20) << 20

    def take(self, n: int) -> memoryview:
        """A writable buffer of `n` bytes (1-D, unsigned bytes), its contents undefined."""
        size = self._size(n)
        with self._lock:
            held = self._held.setdefault(size, [])
            arr = next((a for a in held if not self._leases.held(a)), None)
            if arr is None:
                arr = np.empty(size, np.uint8)
                if self._bytes + size > self._keep:
                    return memoryview(arr)[:n]
                held.append(arr)
                self._bytes += size
            return self._leases.lend(arr, n)
