"""A worker cut off from one shard (a TCP link that resets, while that server stays up for the
others) retries there until the link returns. The weights the other shards sent it at the start
of that wait are old by then: the worker reads them again before it trains on them, so its next
push is not stale by everything the other workers pushed meanwhile (in async mode nothing else
bounds that). The same holds for weights prefetched in full before a push that met the outage.
Real server processes, on every transport."""

import threading
import time

import pytest
import torch

from ps import local
from ps.config import OptimizerConfig
from ps.worker.client import PSClient
from tests.proxy import Proxy

OTHERS = 6  # pushes another worker makes while the link is cut


def _wait(predicate, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def _on_shards(client, names):
    return {n: {s.name: k for k in range(len(client.servers)) for s in client.plan.slices_for(k)}[n] for n in names}


@pytest.mark.parametrize("transport", ["unary", "stream", "shm"])
@pytest.mark.parametrize("how", ["push_pull", "pull", "prefetch"])
def test_weights_read_before_a_cut_link_came_back_are_read_again(cluster, transport_for, monkeypatch, transport,
                                                                 how):
    transport = transport_for(transport)
    # shm: the segment's requests go on a gRPC stream through the proxy, not on the server's local
    # socket (ps.local), which is no link that can be cut.
    monkeypatch.setattr(local, "SUPPORTED", False)
    with cluster(2, "async", 2) as addresses:
        proxy = Proxy(addresses[0])
        tensors = {"a": torch.zeros(64), "b": torch.zeros(64)}
        late = PSClient([proxy.address, addresses[1]], "late", transport=transport, retry_timeout=60)
        other = PSClient(addresses, "other", transport=transport)
        observer = PSClient(addresses, heartbeat=False)
        try:
            opt = OptimizerConfig("sgd", lr=0.1)
            late.setup(tensors, opt)
            other.setup(tensors, opt)
            observer.attach(late.plan.specs.values())
            assert sorted(_on_shards(late, tensors).values()) == [0, 1]  # one tensor on each shard
            into = {n: torch.zeros(64) for n in tensors}
            late.pull(0, into=into)
            grads = {n: torch.ones(64) for n in tensors}
            if how == "pull":  # the cut comes between a push and the pull after it
                late.push(grads, 0)
            if how == "prefetch":  # the next step's weights, read in full before the push that meets the cut
                ahead = late.prefetch(1)
                _wait(lambda: ahead._task.done())
            pulls = observer.stats()[1]["pulls"]
            proxy.cut()
            done = threading.Event()

            def step():
                if how == "push_pull":
                    late.push_pull(grads, 0, into=into)
                elif how == "pull":
                    late.pull(1, into=into)
                else:
                    late.push(grads, 0)
                done.set()

            thread = threading.Thread(target=step)
            thread.start()
            if how == "pull":
                _wait(lambda: observer.stats()[1]["pulls"] > pulls)  # shard 1 read the weights
            else:
                _wait(lambda: observer.stats()[1]["version"] >= 1)  # shard 1 took the push (and answered)
            time.sleep(0.3)  # shard 1's answer is back
            for clock in range(OTHERS):
                other.push({n: torch.full((64,), 0.5) for n in tensors}, clock)
            assert not done.is_set()  # still waiting for shard 0
            proxy.restore()
            thread.join(60)
            assert done.is_set()
            if how == "prefetch":
                ahead.install(into)
            # The weights the late worker holds are the servers' weights now, on both shards.
            now = observer.pull(0, observer=True)
            for n in tensors:
                assert torch.equal(into[n], now[n]), n
            # Its next push is based on what it holds: stale by nothing (no one pushed since).
            results = late.push(grads, 1)
            assert [r["staleness"] for r in results] == [0, 0], results
        finally:
            for c in (late, other, observer):
                c.close()
            proxy.close()
