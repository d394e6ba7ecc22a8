"""Holding many workers: waiting requests hold no thread, liveness judged by progress, the
client's fan-outs never nest on a bounded pool, and a prefetch ends when its step fails."""

import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ps import wire
from ps.config import OptimizerConfig
from ps.proto import ps_pb2 as pb
from ps.proto import ps_pb2_grpc
from ps.sharding import ParamSpec
from ps.worker.client import PSClient
from tests.conftest import run_in_threads

SGD1 = OptimizerConfig("sgd", lr=1.0, momentum=0.0)


def _within(seconds, fn):
    """fn()'s result, or a failure if it has not returned within `seconds` (it runs on a thread)."""
    out, done = [], threading.Event()

    def run():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out.append(e)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(seconds), f"did not return within {seconds}s"
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def test_health_and_stats_answer_at_once_while_64_pulls_wait(cluster):
    with cluster(1, "sync", num_workers=65) as (address,):
        first = PSClient([address], "w0", heartbeat=False)
        first.setup({"w": torch.zeros(16)}, SGD1)
        channel = grpc.insecure_channel(address)
        stub = ps_pb2_grpc.ParameterServerStub(channel)
        fp = first.plan.fingerprint
        for i in range(1, 65):
            stub.Register(pb.RegisterRequest(worker_id=f"w{i}", plan_fingerprint=fp))
        # Step 0 needs all 65 pushes; w0 never pushes, so these 64 pulls for clock 1 wait.
        waiting = [stub.Pull.future(pb.PullRequest(worker_id=f"w{i}", plan_fingerprint=fp, clock=1, keys=["w#0"]))
                   for i in range(1, 65)]
        time.sleep(1.0)
        assert not any(f.done() for f in waiting), "the pulls must wait for step 0"
        t = time.monotonic()
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        assert check.status == health_pb2.HealthCheckResponse.SERVING
        stats = stub.Stats(pb.StatsRequest(), timeout=1.0)
        assert time.monotonic() - t < 1.0
        assert stats.active_workers == 65 and stats.version == 0
        for f in waiting:
            f.cancel()
        channel.close()
        first.close()


def test_a_worker_whose_heartbeat_runs_but_whose_loop_is_stuck_is_evicted_by_progress(cluster):
    with cluster(2, "sync", num_workers=3, extra=["--progress-timeout", "5", "--worker-timeout", "30"]) as servers:
        stuck = PSClient(servers, "stuck", partition_bytes=4096)  # heartbeats keep running
        stuck.setup({"w": torch.zeros(2000)}, SGD1)

        def train(i):
            with PSClient(servers, f"w{i}", partition_bytes=4096) as c:
                clock = c.setup({"w": torch.zeros(2000)}, SGD1)
                for step in range(clock, 5):
                    results, _ = c.push_pull({"w": torch.ones(2000)}, step)
                    assert all(r["outcome"] in ("ACCUMULATED", "APPLIED") for r in results), results
                c.leave()

        run_in_threads(train, 2, timeout=120)  # would wait for "stuck" forever without progress eviction
        stats = stuck.stats()
        assert [s["stalled_evictions"] for s in stats] == [1, 1]
        assert all(s["version"] == 5 for s in stats)
        # The stuck worker's push comes too late: it is refused EVICTED (not DUPLICATE: it was never
        # applied), the client has registered again, and the floor says where to go on from.
        results = stuck.push({"w": torch.ones(2000)}, 0)
        assert [r["outcome"] for r in results] == ["EVICTED", "EVICTED"]
        assert stuck.clock_floor == 5
        assert torch.equal(stuck.pull(5)["w"], torch.full((2000,), -5.0))
        stuck.close()


def test_init_that_must_register_again_with_two_shards_does_not_deadlock(cluster):
    with cluster(2, "async", num_workers=1, worker_timeout=1.0) as servers:
        c = PSClient(servers, "a", partition_bytes=4096, heartbeat=False)
        c.register([ParamSpec("w", (3000,))])
        time.sleep(2.5)  # both shards evict the silent worker
        assert _within(30, lambda: c.init({"w": torch.ones(3000)}, SGD1)) is True
        assert torch.equal(c.pull(0)["w"], torch.ones(3000))
        c.close()


def test_a_prefetch_waiting_for_its_own_push_is_cancelled_at_once_when_the_step_fails(cluster):
    with cluster(1, "ssp", num_workers=1) as servers:  # ssp:0: clock 1 waits for this worker's push 0
        c = PSClient(servers, "a")
        c.setup({"w": torch.zeros(8)}, SGD1)
        ahead = c.prefetch(1)
        time.sleep(0.3)
        _within(5, ahead.cancel)  # the step failed: its push will never come
        c.close()


def test_a_pull_answer_that_lacks_a_slice_is_refused(cluster):
    from ps.errors import InvalidArgument
    from ps.worker.codec import Pulled

    with cluster(1, "async", num_workers=1) as servers:
        c = PSClient(servers, "a", partition_bytes=4096)
        c.setup({"w": torch.zeros(3000)}, SGD1)
        pulled = Pulled(c.plan, c.servers, None, None)
        pulled.absorb(0, wire.PullIn(pb.PullResponse(version=0), []))
        with pytest.raises(InvalidArgument, match="lack 3 slices"):
            pulled.finish()
        c.close()


def _final(servers, numel):
    with PSClient(servers, heartbeat=False, partition_bytes=65536) as obs:
        obs.attach([ParamSpec("w", (numel,))])
        return obs.pull(0, observer=True)["w"], obs.stats()


def _run_load(servers, workers, steps, numel, per_process, extra=()):
    from ps import loadgen

    procs = [loadgen.spawn(servers, first, min(per_process, workers - first), steps, numel, 65536, extra=extra)
             for first in range(0, workers, per_process)]
    results = loadgen.collect(procs, timeout=600)
    assert len(results) == workers
    errors = [r["error"] for r in results if r["error"]]
    assert not errors, errors[:3]
    return results


@pytest.mark.slow
def test_64_sync_workers_on_2_default_shards_average_every_step_exactly(cluster):
    workers, steps, numel = 64, 5, 1 << 18  # 1 MiB model, 16 slices over 2 shards
    with cluster(2, "sync", num_workers=workers) as servers:
        results = _run_load(servers, workers, steps, numel, per_process=32)
        final, stats = _final(servers, numel)
    # sgd, lr 1: every step subtracts the average of 1..64; one missing gradient would show.
    assert torch.equal(final, torch.full((numel,), -steps * (workers + 1) / 2))
    for s in stats:
        assert (s["version"], s["evictions"], s["dropped"], s["duplicates"], s["rejected"]) == (steps, 0, 0, 0, 0)
        assert s["pushes"] == workers * steps
    for r in results:
        assert set(r["outcomes"]) <= {"ACCUMULATED", "APPLIED"} and sum(r["outcomes"].values()) == 2 * steps


@pytest.mark.slow
def test_256_async_clients_with_retries_sum_exactly(cluster):
    workers, steps, numel = 256, 6, 1 << 15  # 128 KiB model, 2 slices over 2 shards
    with cluster(2, "async", num_workers=workers) as servers:
        results = _run_load(servers, workers, steps, numel, per_process=64, extra=["--retry-every", "2"])
        final, stats = _final(servers, numel)
    # A worker joining after the others pushed starts at the slowest clock: count what each pushed.
    pushed = {r["worker"]: len(r["step_times"]) for r in results}
    assert torch.equal(final, torch.full((numel,), -float(sum((i + 1) * n for i, n in pushed.items()))))
    assert sum(s["pushes"] for s in stats) == 2 * sum(pushed.values())
    assert sum(s["evictions"] + s["rejected"] for s in stats) == 0
    for r in results:  # a retry at every even clock, answered DUPLICATE by both shards
        n = pushed[r["worker"]]
        retries = sum(1 for c in range(steps - n, steps) if c % 2 == 0)
        assert r["outcomes"] == {"APPLIED": 2 * n, **({"DUPLICATE": 2 * retries} if retries else {})}, r["outcomes"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_workers_on_a_model_too_large_for_the_event_loop_stay_exact_on_the_thread_pool(cluster, mode):
    from ps.server.servicer import INLINE_ELEMENTS

    workers, steps, numel = 12, 4, 4 * INLINE_ELEMENTS  # 2 shards of 2x the inline size: tensor work on the pool
    with cluster(2, mode, num_workers=workers) as servers:
        results = _run_load(servers, workers, steps, numel, per_process=6,
                            extra=["--retry-every", "2"] if mode == "async" else ())
        final, stats = _final(servers, numel)
    pushed = {r["worker"]: len(r["step_times"]) for r in results}
    if mode == "sync":
        assert torch.equal(final, torch.full((numel,), -steps * (workers + 1) / 2))
        assert all((s["version"], s["dropped"], s["duplicates"]) == (steps, 0, 0) for s in stats)
    else:
        assert torch.equal(final, torch.full((numel,), -float(sum((i + 1) * n for i, n in pushed.items()))))
        assert sum(s["pushes"] for s in stats) == 2 * sum(pushed.values())
    assert sum(s["evictions"] + s["rejected"] for s in stats) == 0
