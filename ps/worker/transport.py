"""The client's transport: one grpc.aio channel per server, all on one event loop that runs on
a thread of the client's own, and one way to make a call (errors mapped to PSError, retries
with backoff while a server is down or overloaded, one re-registration when it no longer knows
the worker). Fan-outs are coroutines gathered on that loop: no thread per call, no pool that
a nested fan-out could exhaust."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Awaitable, Callable, Coroutine, Sequence, TypeVar

import grpc

from ps import tls, wire
from ps.config import grpc_options
from ps.errors import (Cancelled, DeadlineExceeded, NotInitialized, Overloaded, PSError, Unavailable, UnknownWorker,
                       error_from_wire)
from ps.server.servicer import ERROR_CLASS_KEY

log = logging.getLogger("ps.worker")
WAITING_NOTICE = 10.0  # seconds between "waiting for server" warnings while a call retries
T = TypeVar("T")
DEFAULT = object()  # "use the transport's rpc_timeout"
# A call that failed with these is tried again, with backoff. CANCELLED from the other side (this
# client's own cancellations surface as asyncio.CancelledError, never as a status) means the
# server or the connection gave up on the call, as with UNAVAILABLE: every call is safe to repeat.
RETRIED = (Unavailable, Overloaded, Cancelled)


def mapped(e: grpc.RpcError) -> PSError:
    """The PSError a failed call stands for (the class the server raised, or its status code's)."""
    meta = dict(e.trailing_metadata() or ())
    return error_from_wire(e.code().name, meta.get(ERROR_CLASS_KEY), e.details() or "")


class Transport:
    """Channels to `servers` on a private event loop. `run` and `submit` hand it coroutines from
    any other thread; everything else runs on the loop."""

    def __init__(self, servers: Sequence[str], *, metadata=None, retry_timeout: float = 60.0,
                 rpc_timeout: float = 120.0, tls_ca: str = "", tls_cert: str = "", tls_key: str = ""):
        self.servers = list(servers)
        self.metadata, self.retry_timeout, self.rpc_timeout = metadata, retry_timeout, rpc_timeout
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="ps-client-loop")
        self._thread.start()
        self._tls = (tls_ca, tls_cert, tls_key)
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[wire.Stub] = []
        self._told = [0.0] * len(self.servers)  # per server: when the user was last told it is awaited
        self.run(self._open())

    async def _open(self) -> None:
        ca, cert, key = self._tls
        self._channels = [tls.aio_channel(s, grpc_options(), ca, cert, key) for s in self.servers]
        self._stubs = [wire.Stub(c) for c in self._channels]

    # -- from other threads -------------------------------------------------------------------
    def run(self, coro: Coroutine[object, object, T]) -> T:
        """Run `coro` on the loop and wait for its result (from any thread but the loop's)."""
        self._check_open(coro)
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("Transport.run called on its own event loop: await the coroutine instead")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def _check_open(self, coro) -> None:
        if self.loop.is_closed():
            coro.close()
            raise PSError("the client is closed")

    def submit(self, coro: Coroutine[object, object, T]) -> concurrent.futures.Future:
        """Start `coro` on the loop; its future can be waited on or cancelled from any thread."""
        self._check_open(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def start(self, coro: Coroutine[object, object, T]) -> "asyncio.Task[T]":
        """`coro` as a task on the loop; `result` waits for it, `cancel` ends it."""
        async def create() -> asyncio.Task:
            return asyncio.ensure_future(coro)

        return self.run(create())

    def result(self, task: "asyncio.Task[T]") -> T:
        async def wait() -> T:
            return await task

        return self.run(wait())

    def cancel(self, task: asyncio.Task) -> None:
        """Cancel the task and return once it has ended (its errors are dropped)."""
        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        self.run(stop())

    def close(self) -> None:
        """Cancel what is in flight, close the channels, stop the loop."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ch in self._channels:
                await ch.close()

        self.run(shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    # -- on the loop ---------------------------------------------------------------------------
    async def wait_connected(self, timeout: float) -> None:
        async def one(k: int) -> None:
            try:
                await asyncio.wait_for(self._channels[k].channel_ready(), timeout)
            except asyncio.TimeoutError as e:
                raise Unavailable(f"server {self.servers[k]} did not answer within {timeout:.0f}s") from e

        await asyncio.gather(*(one(k) for k in range(len(self.servers))))

    async def attempt(self, shard: int, method: str, request, timeout: float | None | object = DEFAULT):
        """One try, errors mapped to PSError."""
        t = self.rpc_timeout if timeout is DEFAULT else timeout
        try:
            return await getattr(self._stubs[shard], method)(request, timeout=t, metadata=self.metadata)
        except grpc.RpcError as e:
            raise mapped(e) from e

    async def call(self, shard: int, method: str, request, timeout: float | None | object = DEFAULT, *,
                   retry: bool = True, rejoin: Callable[[], Awaitable[None]] | None = None, waits: bool = False):
        """One call with retries: while the server is unavailable or overloaded (backoff, up to
        retry_timeout); after `rejoin()` once if the server no longer knows this worker; and,
        for a call that `waits` (a pull waiting for other workers), again whenever its deadline
        passes, for as long as the server keeps the worker (it evicts stalled peers)."""
        start = time.monotonic()
        deadline = start + self.retry_timeout
        delay = 0.05
        while True:
            try:
                return await self.attempt(shard, method, request, timeout)
            except (UnknownWorker, NotInitialized) as err:  # NotInitialized: restarted empty (rejoin re-inits)
                if rejoin is None:
                    raise
                log.warning("%s: %s; registering again", self.servers[shard], err)
                await rejoin()
                rejoin = None
            except DeadlineExceeded:
                if not waits:
                    raise
                log.debug("%s: %s still waiting; asking again", self.servers[shard], method)
            except RETRIED as err:
                now = time.monotonic()
                if not retry or now + delay >= deadline:
                    raise
                # A server down (restarting?): say so now and then, once for all the calls waiting on it.
                if now - start >= WAITING_NOTICE and now - self._told[shard] >= WAITING_NOTICE:
                    self._told[shard] = now
                    log.warning("waiting for server %s (%s) for %.0fs; retrying until %.0fs (--retry-timeout): %s",
                                self.servers[shard], method, now - start, self.retry_timeout, err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def gather_all(coros: Sequence[Awaitable[T]]) -> list[T]:
    """Await all; raise the first error once every one has ended (none is left running)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return list(results)
