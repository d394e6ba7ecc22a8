"""Several processes pushing as one worker (a tensor-parallel group's ranks, each with keys of its
own): one push per clock at the servers, so one version, one clock and one staleness per group
step; exact sums under retries; each member's push answers the group push's outcome."""

import threading

import pytest
import torch

from ps.config import OptimizerConfig
from ps.errors import InvalidArgument
from ps.proto import ps_pb2 as pb
from ps.sharding import ParamSpec
from ps.worker.client import PSClient
from tests.conftest import run_in_threads

SIZE = 3000
# member 0 holds "shared" (a replicated parameter, pushed by rank 0 only) and its shard "w@tp0"
KEYS = {0: ("shared", "w@tp0"), 1: ("w@tp1",)}
INIT = {"shared": torch.zeros(7), "w@tp0": torch.zeros(SIZE), "w@tp1": torch.zeros(SIZE)}


def _observe(addresses):
    with PSClient(addresses, partition_bytes=4096, heartbeat=False) as obs:
        obs.attach([ParamSpec(n, tuple(t.shape)) for n, t in INIT.items()])
        return obs.pull(0, observer=True), obs.stats()


def test_a_group_alone_pushes_once_per_step_with_staleness_zero_in_async(cluster):
    """One group of two members, pull then push each step: a push sees exactly the version it
    pulled (staleness 0) and each step is one version. Counting each member as a worker of its
    own, the second member's gradient lands after the first member's update: staleness 1."""
    steps = 12
    with cluster(2, "async", num_workers=1) as addresses:
        results: list[list[dict]] = [[], []]
        clients = [PSClient(addresses, "g0", member=(m, 2), partition_bytes=4096) for m in range(2)]
        try:
            for c in clients:
                c.setup(INIT, OptimizerConfig("sgd", lr=1.0))

            def member(m: int) -> None:
                c = clients[m]
                for clock in range(steps):
                    c.pull(clock, names=list(KEYS[m]))
                    results[m].append(c.push({k: torch.ones_like(INIT[k]) for k in KEYS[m]}, clock))

            run_in_threads(member, 2)
            final, stats = _observe(addresses)
        finally:
            for c in clients:
                c.close()
    for m in range(2):
        assert [r["outcome"] for rs in results[m] for r in rs] == ["APPLIED"] * (2 * steps)
        assert all(r["staleness"] == 0 for rs in results[m] for r in rs)
    for s in stats:
        assert s["version"] == steps and s["pushes"] == steps
        assert s["staleness_histogram"] == {0: steps}
        assert s["clocks"] == {"g0": steps}
    for k, t in final.items():
        assert torch.equal(t, torch.full_like(t, -float(steps))), k


def test_two_groups_with_retries_sum_exactly_and_count_one_push_per_group_step(cluster):
    groups, steps = 2, 30
    with cluster(2, "async", num_workers=groups) as addresses:
        outcomes: list[list[str]] = [[] for _ in range(2 * groups)]
        start = threading.Barrier(2 * groups)

        def member(i: int) -> None:
            g, m = divmod(i, 2)
            with PSClient(addresses, f"g{g}", member=(m, 2), partition_bytes=4096) as c:
                c.setup(INIT, OptimizerConfig("sgd", lr=1.0))
                grads = {k: torch.full_like(INIT[k], float(g + 1)) for k in KEYS[m]}
                start.wait()
                for clock in range(steps):
                    outcomes[i] += [r["outcome"] for r in c.push(grads, clock)]
                    if clock % 10 == 0:  # a retry of the same clock (e.g. after a lost reply)
                        outcomes[i] += [r["outcome"] for r in c.push(grads, clock)]

        run_in_threads(member, 2 * groups)
        final, stats = _observe(addresses)
    expected = -float(steps * sum(range(1, groups + 1)))
    for k, t in final.items():
        assert torch.equal(t, torch.full_like(t, expected)), k
    assert all(o in ("APPLIED", "DUPLICATE") for os_ in outcomes for o in os_), outcomes
    for s in stats:
        assert s["version"] == groups * steps and s["pushes"] == groups * steps
        assert sum(s["staleness_histogram"].values()) == groups * steps


def test_a_group_in_sync_averages_as_one_worker_beside_a_plain_one(cluster):
    """Sync: the group's push is one worker's gradient in the step's average (the servers expect
    two workers: the group and a plain worker)."""
    with cluster(2, "sync", num_workers=2) as addresses:
        def member(i: int) -> None:
            if i == 2:  # the plain worker pushes every key
                with PSClient(addresses, "plain", partition_bytes=4096) as c:
                    c.setup(INIT, OptimizerConfig("sgd", lr=1.0))
                    for clock in range(3):
                        c.push({k: torch.full_like(t, 3.0) for k, t in INIT.items()}, clock)
                        c.pull(clock + 1)
                return
            with PSClient(addresses, "g0", member=(i, 2), partition_bytes=4096) as c:
                c.setup(INIT, OptimizerConfig("sgd", lr=1.0))
                for clock in range(3):
                    results = c.push({k: torch.ones_like(INIT[k]) for k in KEYS[i]}, clock)
                    assert all(r["outcome"] in ("ACCUMULATED", "APPLIED") for r in results), results
                    c.pull(clock + 1, names=list(KEYS[i]))

        run_in_threads(member, 3)
        final, stats = _observe(addresses)
    for k, t in final.items():  # three steps of mean(1, 3) = 2
        assert torch.equal(t, torch.full_like(t, -6.0)), k
    assert all(s["version"] == 3 for s in stats)


def test_bad_member_fields_are_refused_and_change_nothing(cluster):
    with cluster(1, "async", num_workers=1) as addresses:
        with PSClient(addresses, "g0", member=(0, 2)) as c:
            c.setup(INIT, OptimizerConfig("sgd", lr=1.0))
            layout = c._codec.layout({k: torch.float32 for k in KEYS[0]})
            flat = c._codec.split({k: torch.ones_like(INIT[k]) for k in KEYS[0]})
            good = c._push_request(0, layout[0], flat)

            def sent(member: int, members: int, num_parts: int = 1):
                header = pb.PushRequest(worker_id="g0", plan_fingerprint=c.plan.fingerprint, clock=0, part=0,
                                        num_parts=num_parts, member=member, members=members)
                req = pb.PushRequest.FromString(bytes(good.tobytes()))
                req.MergeFrom(header)
                return c._t.run(c._t.attempt(0, "Push", req))

            with pytest.raises(InvalidArgument, match=r"member \(2\) of members \(2\)"):
                sent(2, 2)
            with pytest.raises(InvalidArgument, match=r"members \(2000\)"):
                sent(0, 2000)
            # part 0 of member 0's two: held (member 0's other part and member 1's are still to come)
            assert sent(0, 2, num_parts=2).outcome == pb.PushResponse.BUFFERED
            with pytest.raises(InvalidArgument, match=r"members \(3\) differs from earlier parts' \(2\)"):
                sent(1, 3, num_parts=2)
            stats = c.stats()[0]
            assert stats["version"] == 0 and stats["rejected"] == 3
            with pytest.raises(InvalidArgument, match=r"member \(2\) must be in \[0, members=2\)"):
                PSClient(addresses, "g0", member=(2, 2))


def test_hold_before_init_is_refused_with_what_to_do(cluster):
    with cluster(1, "async", num_workers=1) as addresses, PSClient(addresses, "w") as c:
        c.register([ParamSpec("w", (4,))])
        with pytest.raises(InvalidArgument, match=r"call init \(or setup\) first"):
            c.hold({"w": torch.zeros(4)})
