"""Async mode loses and doubles nothing: concurrent clients, multi-part pushes, retries."""

import threading

import pytest
import torch

from ps.config import OptimizerConfig
from ps.sharding import ParamSpec
from ps.worker.client import PSClient
from tests.conftest import run_in_threads

CLIENTS, PUSHES, SIZE = 8, 100, 5000


@pytest.mark.parametrize("transport", ["stream", "unary", "shm", "tcp"])
def test_eight_concurrent_clients_pushing_known_gradients_sum_exactly(cluster, transport_for, transport):
    transport_for(transport)
    with cluster(2, "async", num_workers=CLIENTS) as addresses:
        init = {"w": torch.zeros(SIZE), "b": torch.zeros(3)}
        outcomes: list[list[str]] = [[] for _ in range(CLIENTS)]
        start = threading.Barrier(CLIENTS)

        def client(i: int) -> None:
            with PSClient(addresses, f"c{i}", partition_bytes=4096, transport=transport) as c:
                c.setup(init, OptimizerConfig("sgd", lr=1.0))
                assert c.paths() == [transport] * len(addresses)
                grads = {"w": torch.full((SIZE,), float(i + 1)), "b": torch.full((3,), float(i + 1))}
                start.wait()
                for clock in range(PUSHES):
                    outcomes[i] += [r["outcome"] for r in c.push(grads, clock)]
                    if clock % 10 == 0:  # a retry of the same clock (e.g. after a lost reply)
                        outcomes[i] += [r["outcome"] for r in c.push(grads, clock)]
                    if clock % 25 == 0:
                        c.pull(clock)

        run_in_threads(client, CLIENTS)
        with PSClient(addresses, partition_bytes=4096, heartbeat=False) as obs:
            obs.attach([ParamSpec(n, tuple(t.shape)) for n, t in init.items()])
            final = obs.pull(0, observer=True)
            stats = obs.stats()

    expected = -float(PUSHES * sum(range(1, CLIENTS + 1)))  # lr 1: w = -sum of all gradients
    assert torch.equal(final["w"], torch.full((SIZE,), expected))
    assert torch.equal(final["b"], torch.full((3,), expected))
    for per_client in outcomes:
        assert per_client.count("DUPLICATE") == 2 * 10  # 10 retries, one answer per shard each
    assert sum(s["pushes"] for s in stats) == 2 * CLIENTS * PUSHES
    assert sum(s["rejected"] for s in stats) == 0
    assert all((s["shm_bytes"] > 0) == (transport == "shm") for s in stats)
