"""Load: 32 concurrent clients against 2 async servers, each pushing known gradients (with
retries of the same clock), in identical rounds. The final values are exactly the sum of everything
pushed once, and the servers' memory stays bounded: after the first round, three more grow neither
server's RSS by more than the allocator's noise."""

import io
import threading

import torch

from ps.cli.launch import start_servers, stop_all
from ps.config import OptimizerConfig
from ps.sharding import ParamSpec
from ps.worker.client import PSClient
from tests.conftest import run_in_threads

CLIENTS, PUSHES, SIZE = 32, 40, 20_000
ROUNDS = 4
# RSS after a round is not the same to the byte from one identical round to the next: it moves by
# up to about 2 MiB either way, and creeps by about 0.5 MiB a round over twelve rounds (allocator
# arenas and gRPC's buffer pools; tracemalloc shows no growth of the server's Python objects), so
# "no higher" cannot be asserted to the byte. A round sends each server 1440 pushes carrying about
# 55 MiB of gradients: keeping any payload would grow RSS by tens of MiB a round; 8 MiB over three
# rounds is under 2 KiB kept per request.
TOLERANCE_MIB = 8


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_32_concurrent_clients_sum_exactly_and_server_memory_does_not_grow_after_the_first_round():
    servers = start_servers(2, "async", CLIENTS, out=io.StringIO())
    addresses = [s.address for s in servers]
    init = {"w": torch.zeros(SIZE), "b": torch.zeros(3)}
    rss = []
    try:
        for round_ in range(ROUNDS):
            start = threading.Barrier(CLIENTS)

            def client(i: int, round_=round_) -> None:
                with PSClient(addresses, f"c{i}", partition_bytes=16384) as c:
                    clock = c.setup(init, OptimizerConfig("sgd", lr=1.0))
                    grads = {"w": torch.full((SIZE,), float(i + 1)), "b": torch.full((3,), float(i + 1))}
                    start.wait()
                    for step in range(clock, clock + PUSHES):
                        c.push(grads, step)
                        if step % 8 == 0:
                            assert all(r["outcome"] == "DUPLICATE" for r in c.push(grads, step))  # a retry
                    c.leave()

            run_in_threads(client, CLIENTS, timeout=600)
            rss.append([rss_mib(s.popen.pid) for s in servers])
        with PSClient(addresses, partition_bytes=16384, heartbeat=False) as obs:
            obs.attach([ParamSpec(n, tuple(t.shape)) for n, t in init.items()])
            final = obs.pull(0, observer=True)
            stats = obs.stats()
    finally:
        stop_all(servers)
    expected = -float(ROUNDS * PUSHES * sum(range(1, CLIENTS + 1)))  # lr 1: minus every gradient once
    assert torch.equal(final["w"], torch.full((SIZE,), expected))
    assert torch.equal(final["b"], torch.full((3,), expected))
    assert sum(s["pushes"] for s in stats) == ROUNDS * 2 * CLIENTS * PUSHES and sum(s["rejected"] for s in stats) == 0
    for k, after in enumerate(zip(*rss)):  # the first round warms the server up: measure from there
        assert max(after[1:]) <= after[0] + TOLERANCE_MIB, f"server {k} RSS (MiB) after each round: {after}"
    print(f"load: {CLIENTS} clients x {PUSHES} pushes x {ROUNDS} rounds; server RSS MiB after each round {rss}")
