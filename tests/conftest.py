"""Shared fixtures: real ps-server processes on free loopback ports."""

from __future__ import annotations

import io
import threading
from contextlib import contextmanager

import pytest
import torch

from ps.cli.launch import start_servers, stop_all


class _Sink(io.StringIO):
    """Collects child output thread-safely (tests read it on failure)."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def write(self, s):
        with self._lock:
            return super().write(s)


@contextmanager
def running_cluster(num_servers=2, mode="sync", num_workers=1, **kwargs):
    """Yield the addresses of `num_servers` real ps-server processes; stop them afterwards."""
    out = _Sink()
    procs = start_servers(num_servers, mode, num_workers, out=out, **kwargs)
    try:
        yield [p.address for p in procs]
    finally:
        stop_all(procs)


def run_in_threads(fn, count, timeout=180):
    """fn(i) on `count` threads at once; re-raise the first exception any of them raised."""
    errors = []

    def guarded(i):
        try:
            fn(i)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread did not finish in time"
    if errors:
        raise errors[0]


@pytest.fixture
def cluster():
    return running_cluster


@pytest.fixture
def transport_for(monkeypatch):
    """transport_for(name) -> name, for clients of a test run on each path. For "shm" every request
    and answer goes through the segment, however small (the tests' models are); for "tcp" every
    pull's answer comes as a split frame, received straight into place."""
    from ps import shm
    from ps.worker import transport as client_transport

    def use(transport: str) -> str:
        if transport == "shm":
            monkeypatch.setattr(shm, "MIN_BYTES", 1)
        if transport == "tcp":
            monkeypatch.setattr(client_transport, "RAW_MIN", 1)
        return transport

    return use


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
