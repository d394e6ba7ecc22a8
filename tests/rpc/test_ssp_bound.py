"""SSP never lets a pull see weights staler than the bound; s = 0 is lock-step.

Each worker j pushes -e_j with SGD lr 1, so w[j] counts worker j's applied updates: a pull at
clock c must see w[j] >= c - s for every worker j still training (and the server's min_clock
must agree)."""

import random
import threading
import time

import pytest
import torch

from ps.config import OptimizerConfig
from ps.worker.client import PSClient
from tests.conftest import run_in_threads

WORKERS, STEPS = 4, 30


def run_ssp(addresses, staleness, transport="auto"):
    observations: list[tuple[int, int, list[float], int]] = []
    lock = threading.Lock()

    def worker(j: int) -> None:
        rng = random.Random(j)
        with PSClient(addresses, f"w{j}", transport=transport) as c:
            c.setup({"w": torch.zeros(WORKERS)}, OptimizerConfig("sgd", lr=1.0))
            assert transport == "auto" or c.paths() == [transport] * len(addresses)
            grad = torch.zeros(WORKERS)
            grad[j] = -1.0
            for clock in range(STEPS):
                w = c.pull(clock)["w"]
                with lock:
                    observations.append((j, clock, w.tolist(), min(c.last_min_clocks.values())))
                time.sleep(rng.random() * 0.02 * (1 + 3 * (j == 0)))  # worker 0 straggles
                c.push({"w": grad}, clock)
            c.pull(STEPS)  # finish in step with the others before leaving
            c.leave()

    run_in_threads(worker, WORKERS)
    assert len(observations) == WORKERS * STEPS
    return observations


@pytest.mark.parametrize("staleness, transport", [(0, "unary"), (1, "stream"), (3, "shm"), (2, "tcp")],
                         ids=["0-unary", "1-stream", "3-shm", "2-tcp"])
def test_no_pull_returns_weights_staler_than_the_bound(cluster, transport_for, staleness, transport):
    transport_for(transport)
    with cluster(2, "ssp", num_workers=WORKERS, staleness=staleness) as addresses:
        observations = run_ssp(addresses, staleness, transport)
    for j, clock, w, min_clock in observations:
        assert min_clock >= clock - staleness
        assert min(w) >= clock - staleness, f"worker {j} at clock {clock} saw {w}"
        assert w[j] == clock  # its own updates are always there
    if staleness == 0:  # lock-step: nobody is ever more than one push ahead of a reader
        assert all(max(w) <= clock + 1 for _, clock, w, _ in observations)
    if staleness >= 2:  # with a straggler, the bound is really used: readers see others run ahead
        assert any(max(w) > clock + 1 for _, clock, w, _ in observations)
