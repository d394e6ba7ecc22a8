"""Admission control: requests beyond the bound on in-flight bytes wait for room, then are refused."""

import asyncio

import pytest

from ps.config import ServerConfig
from ps.errors import Overloaded
from ps.server.servicer import Admission
from ps.server.shard import Shard

MiB = 1 << 20


def test_a_request_beyond_the_bound_waits_for_room_then_goes_in():
    shard = Shard(ServerConfig(mode="async"))
    gate = Admission(shard, 2 * MiB, wait=5.0)
    order = []

    async def main():
        async def big(name, seconds):
            async with gate.hold(MiB + 1):
                order.append(name)
                await asyncio.sleep(seconds)

        first = asyncio.create_task(big("first", 0.2))
        await asyncio.sleep(0.05)
        await big("second", 0)  # does not fit beside the first: waits until it ends
        await first

    asyncio.run(main())
    assert order == ["first", "second"] and gate.used == 0


def test_a_request_that_finds_no_room_in_time_is_refused_and_counted():
    shard = Shard(ServerConfig(mode="async"))
    gate = Admission(shard, MiB, wait=0.1)

    async def main():
        held = asyncio.Event()

        async def hog():
            async with gate.hold(MiB):
                held.set()
                await asyncio.sleep(1)

        task = asyncio.create_task(hog())
        await held.wait()
        with pytest.raises(Overloaded, match="max_inflight_bytes"):
            async with gate.hold(1):
                pass
        async with gate.hold(0):  # requests without tensors never wait
            pass
        task.cancel()

    asyncio.run(main())
    assert shard.stats()["overloaded"] == 1


def test_a_request_larger_than_the_bound_alone_is_let_in():
    gate = Admission(Shard(ServerConfig(mode="async")), MiB, wait=0.1)

    async def main():
        async with gate.hold(10 * MiB):
            assert gate.used == 10 * MiB

    asyncio.run(main())
