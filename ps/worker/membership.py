"""A worker's membership of every shard: registration (aligned across shards), the clock floor
the servers will take pushes from, the versions it has read, and heartbeats. One object owns
these, on the client's event loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from ps.errors import PSError
from ps.proto import ps_pb2 as pb
from ps.sharding import Plan
from ps.worker.transport import Transport, gather_all

log = logging.getLogger("ps.worker")


class Membership:
    def __init__(self, transport: Transport, worker_id: str, heartbeat: bool = True):
        self.t, self.worker_id, self.want_heartbeat = transport, worker_id, heartbeat
        n = len(transport.servers)
        self.plan: Plan | None = None
        self.info: list[pb.RegisterResponse] = []
        self.versions: list[int] = [0] * n  # per shard: the oldest version this worker's weights hold
        self.min_clocks: dict[int, int] = {}
        self.clock_floor = 0  # the lowest clock the servers will take from this worker
        self.left = False
        # reinit(shard): initialise a shard that restarted empty again (set once the worker holds weights)
        self.reinit: Callable[[int], Awaitable[None]] | None = None
        self._lock: asyncio.Lock | None = None
        self._beat: asyncio.Task | None = None

    async def _register_one(self, shard: int, clock: int) -> pb.RegisterResponse:
        assert self.plan is not None
        req = pb.RegisterRequest(worker_id=self.worker_id, plan_fingerprint=self.plan.fingerprint, clock=clock,
                                 seen_version=self.versions[shard])
        resp = await self.t.call(shard, "Register", req)
        self.t.negotiate(shard, resp.transports, resp.host, resp.local_socket, resp.data_port, resp.server_id)
        self.clock_floor = max(self.clock_floor, resp.clock)
        return resp

    async def join(self, clock: int = 0) -> list[pb.RegisterResponse]:
        """Register with every shard (at least at `clock`) and align: shards that would put this
        worker at a lower clock than another shard are told the highest one, so no shard waits
        for a step this worker will never push there. One join at a time."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            n = len(self.t.servers)
            infos = await gather_all([self._register_one(k, clock) for k in range(n)])
            start = max(r.clock for r in infos)
            behind = [k for k, r in enumerate(infos) if r.clock < start]
            for k, r in zip(behind, await gather_all([self._register_one(k, start) for k in behind])):
                infos[k] = r
            self.info = infos
            if self.reinit is not None:  # a shard that restarted empty: its values from this worker's
                await gather_all([self.reinit(k) for k, r in enumerate(infos) if not r.initialized])
            return infos

    def rejoiner(self, clock: int):
        """What a call does when a shard no longer knows this worker: join again at `clock`
        (the worker's own clock), unless it has left."""
        async def rejoin() -> None:
            if self.left or self.plan is None:
                raise PSError(f"worker {self.worker_id!r} has left; it does not register again")
            await self.join(clock)

        return rejoin

    def start_heartbeat(self) -> None:
        if self.want_heartbeat and self._beat is None:
            self._beat = asyncio.get_running_loop().create_task(self._heartbeat_loop())

    async def _heartbeat_loop(self) -> None:
        """Renew the lease on every shard at once, one attempt each: a shard that is down must
        not delay the others (a worker the shards evicted registers again on its next call)."""
        interval = max(0.05, min(r.worker_timeout for r in self.info) / 4)
        request = pb.WorkerRef(worker_id=self.worker_id)

        async def beat(k: int) -> None:
            try:
                await self.t.attempt(k, "Heartbeat", request, timeout=interval * 2)
            except PSError as e:
                log.debug("heartbeat to %s failed: %s", self.t.servers[k], e)

        while True:
            await asyncio.sleep(interval)
            await asyncio.gather(*(beat(k) for k in range(len(self.t.servers))))

    async def stop_heartbeat(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            await asyncio.gather(self._beat, return_exceptions=True)
            self._beat = None

    async def leave(self) -> None:
        self.left = True
        await self.stop_heartbeat()
        request = pb.WorkerRef(worker_id=self.worker_id)
        await gather_all([self.t.call(k, "Leave", request) for k in range(len(self.t.servers))])
