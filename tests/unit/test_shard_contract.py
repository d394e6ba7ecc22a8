"""One contract for sync, async and ssp, run on the shard state machine without sockets."""

import threading
import time

import pytest
import torch

from ps.config import OptimizerConfig, ServerConfig
from ps.errors import InvalidArgument, NotInitialized, PlanMismatch, StepConflict, UnknownKey, UnknownWorker
from ps.server.policy import SSP, Async, Sync, View, make_policy
from ps.server.shard import Shard
from ps.sharding import ParamSpec, make_plan

MODES = [("sync", 0), ("async", 0), ("ssp", 0), ("ssp", 2)]
SGD1 = OptimizerConfig("sgd", lr=1.0)


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make_shard(mode, staleness=0, num_workers=1, now=None, size=4, extra=False):
    """A shard of one slice "w#0" (and with `extra` a second one, "u#0": pushes in two parts)."""
    shard = Shard(ServerConfig(mode=mode, staleness=staleness, num_workers=num_workers, worker_timeout=5.0),
                  now=now or time.monotonic)
    plan = make_plan([ParamSpec("w", (size,))] + ([ParamSpec("u", (size,))] if extra else []), 1, 1 << 20)
    return shard, plan


def init(shard, plan, worker="a", value=0.0):
    shard.register(worker, plan.fingerprint)
    shard.init(worker, plan, plan.fingerprint, SGD1,
               [(f"{p.name}#0", torch.full((p.numel,), value)) for p in plan.params], 0, 1)


def first_part(shard, plan, worker="a", clock=0):
    """Part 0 of a two-part push (a zero gradient for "u"); part 1 carries "w"."""
    return shard.push(worker, plan.fingerprint, clock, 0, [("u#0", torch.zeros(4))], 0, 2)


def weights(shard):
    (_, data), = shard.pull("", shard.plan.fingerprint, 0, ["w#0"])[0]
    return torch.frombuffer(bytearray(data), dtype=torch.float32)


def push(shard, plan, worker, clock, grad, part=0, num_parts=1):
    return shard.push(worker, plan.fingerprint, clock, shard.version, [("w#0", grad)], part, num_parts)


@pytest.mark.parametrize("mode,s", MODES)
def test_a_retried_push_is_applied_once(mode, s):
    shard, plan = make_shard(mode, s)
    init(shard, plan)
    assert push(shard, plan, "a", 0, torch.ones(4)).outcome == "APPLIED"
    assert push(shard, plan, "a", 0, torch.ones(4)).outcome == "DUPLICATE"
    assert torch.equal(weights(shard), -torch.ones(4))
    assert shard.stats()["duplicates"] == 1


@pytest.mark.parametrize("mode,s", MODES)
def test_a_push_in_parts_is_applied_when_the_last_part_arrives(mode, s):
    shard, plan = make_shard(mode, s, extra=True)
    init(shard, plan)
    assert first_part(shard, plan).outcome == "BUFFERED"
    assert first_part(shard, plan).outcome == "DUPLICATE"
    assert torch.equal(weights(shard), torch.zeros(4))
    assert push(shard, plan, "a", 0, torch.ones(4), part=1, num_parts=2).outcome == "APPLIED"
    assert torch.equal(weights(shard), -torch.ones(4))


@pytest.mark.parametrize("mode,s", MODES)
@pytest.mark.parametrize("grads, error", [
    ([("w#0", torch.ones(5))], InvalidArgument),
    ([("w#0", torch.tensor([1.0, float("nan"), 0, 0]))], InvalidArgument),
    ([("w#0", torch.tensor([1.0, float("inf"), 0, 0]))], InvalidArgument),
    ([("nope#0", torch.ones(4))], UnknownKey),
    ([("w#0", torch.ones(4)), ("w#0", torch.ones(4))], InvalidArgument),
])
def test_bad_gradients_are_refused_counted_and_change_nothing(mode, s, grads, error):
    shard, plan = make_shard(mode, s)
    init(shard, plan, value=3.0)
    with pytest.raises(error):
        shard.push("a", plan.fingerprint, 0, 0, grads, 0, 1)
    assert torch.equal(weights(shard), torch.full((4,), 3.0))
    assert shard.stats()["rejected"] == 1
    assert push(shard, plan, "a", 0, torch.ones(4)).outcome == "APPLIED"  # the clock did not move


@pytest.mark.parametrize("mode,s", MODES)
def test_requests_before_init_or_from_strangers_are_refused(mode, s):
    shard, plan = make_shard(mode, s)
    with pytest.raises(NotInitialized):
        shard.pull("a", plan.fingerprint, 0, ["w#0"])
    init(shard, plan)
    with pytest.raises(UnknownWorker):
        push(shard, plan, "stranger", 0, torch.ones(4))
    with pytest.raises(PlanMismatch):
        shard.register("b", "0" * 16)
    with pytest.raises(InvalidArgument, match="clock"):
        shard.pull("a", plan.fingerprint, -1, ["w#0"])


def test_init_is_idempotent_and_the_first_values_win():
    shard, plan = make_shard("async")
    init(shard, plan, "a", 1.0)
    init(shard, plan, "b", 2.0)
    assert torch.equal(weights(shard), torch.ones(4))


def test_sync_averages_all_workers_then_applies_once():
    shard, plan = make_shard("sync", num_workers=2)
    init(shard, plan)
    shard.register("b", plan.fingerprint)
    assert push(shard, plan, "a", 0, torch.full((4,), 1.0)).outcome == "ACCUMULATED"
    assert torch.equal(weights(shard), torch.zeros(4))
    assert push(shard, plan, "b", 0, torch.full((4,), 3.0)).outcome == "APPLIED"
    assert torch.equal(weights(shard), torch.full((4,), -2.0))
    with pytest.raises(StepConflict):
        push(shard, plan, "a", 2, torch.ones(4))


def test_sync_waits_for_the_quorum_before_the_first_step():
    shard, plan = make_shard("sync", num_workers=2)
    init(shard, plan)
    assert push(shard, plan, "a", 0, torch.ones(4)).outcome == "ACCUMULATED"
    shard.register("b", plan.fingerprint)
    assert push(shard, plan, "b", 0, torch.ones(4)).outcome == "APPLIED"


@pytest.mark.parametrize("mode,s", [("sync", 0), ("ssp", 0), ("ssp", 1)])
def test_an_evicted_worker_stops_blocking_the_others(mode, s):
    now = FakeTime()
    shard, plan = make_shard(mode, s, num_workers=2, now=now)
    init(shard, plan)
    shard.register("b", plan.fingerprint)
    for c in range(s + 1):
        push(shard, plan, "a", c, torch.ones(4))
    done = threading.Event()
    t = threading.Thread(target=lambda: (shard.pull("a", plan.fingerprint, s + 1, ["w#0"]), done.set()))
    t.start()
    assert not done.wait(0.3), "the pull must wait for worker b"
    now.t = 100.0
    shard.heartbeat("a")
    assert shard.evict_expired() == ["b"]
    assert done.wait(5), "the pull must go on once b is evicted"
    t.join()
    assert shard.stats()["evictions"] == 1
    with pytest.raises(UnknownWorker):
        shard.heartbeat("b")


def test_async_pulls_never_wait():
    shard, plan = make_shard("async", num_workers=3)
    init(shard, plan)
    shard.pull("a", plan.fingerprint, 1000, ["w#0"])


def test_staleness_is_measured_from_the_pushed_base_version():
    shard, plan = make_shard("async")
    init(shard, plan)
    shard.register("b", plan.fingerprint)
    for c in range(3):
        push(shard, plan, "a", c, torch.ones(4))
    r = shard.push("b", plan.fingerprint, 0, 1, [("w#0", torch.ones(4))], 0, 1)
    assert r.staleness == 2 and shard.stats()["staleness_histogram"] == {0: 3, 2: 1}


def test_staleness_aware_lr_scales_stale_updates():
    shard = Shard(ServerConfig(mode="async", staleness_lr=True))
    plan = make_plan([ParamSpec("w", (4,))], 1, 1 << 20)
    init(shard, plan)
    shard.register("b", plan.fingerprint)
    push(shard, plan, "a", 0, torch.ones(4))
    shard.push("b", plan.fingerprint, 0, 0, [("w#0", torch.ones(4))], 0, 1)  # staleness 1: lr / 2
    assert torch.allclose(weights(shard), torch.full((4,), -1.5))


def test_policies_answer_as_specified():
    v = View(version=5, clocks=(3, 5, 6), quorum=True)
    assert Sync().pull_ready(5, v) and not Sync().pull_ready(6, v)
    assert Async().pull_ready(10**6, v)
    assert SSP(2).pull_ready(5, v) and not SSP(2).pull_ready(6, v)
    assert not SSP(2).pull_ready(0, View(0, (0,), quorum=False))
    assert not Sync().step_ready(v, 1) and Sync().step_ready(View(5, (6, 6), True), 1)
    assert not Sync().step_ready(View(5, (6, 6), True), 0)
    with pytest.raises(InvalidArgument, match="staleness"):
        make_policy("ssp", -1)
    with pytest.raises(InvalidArgument, match="mode"):
        make_policy("bsp")


def test_sync_with_a_backup_worker_completes_without_the_slowest_and_drops_its_late_push():
    shard = Shard(ServerConfig(mode="sync", num_workers=3, backup_workers=1))
    plan = make_plan([ParamSpec("w", (4,))], 1, 1 << 20)
    init(shard, plan)
    for w in ("b", "c"):
        shard.register(w, plan.fingerprint)
    assert push(shard, plan, "a", 0, torch.full((4,), 1.0)).outcome == "ACCUMULATED"
    assert push(shard, plan, "b", 0, torch.full((4,), 3.0)).outcome == "APPLIED"
    assert torch.equal(weights(shard), torch.full((4,), -2.0))
    assert push(shard, plan, "c", 0, torch.full((4,), 100.0)).outcome == "DROPPED"
    assert torch.equal(weights(shard), torch.full((4,), -2.0))
    assert shard.stats()["dropped"] == 1


def test_backup_workers_are_refused_outside_sync_mode():
    with pytest.raises(InvalidArgument, match="sync mode only"):
        ServerConfig(mode="async", num_workers=3, backup_workers=1)


@pytest.mark.parametrize("mode,s", MODES)
def test_a_push_retried_after_eviction_and_rejoin_is_still_a_duplicate(mode, s):
    now = FakeTime()
    shard, plan = make_shard(mode, s, now=now)
    init(shard, plan)
    assert push(shard, plan, "a", 0, torch.ones(4)).outcome == "APPLIED"  # the reply is lost...
    now.t = 100.0
    assert shard.evict_expired() == ["a"]
    assert shard.register("a", plan.fingerprint)["clock"] == 1  # ...the client comes back
    assert push(shard, plan, "a", 0, torch.ones(4)).outcome == "DUPLICATE"  # ...and retries
    assert torch.equal(weights(shard), -torch.ones(4))


@pytest.mark.parametrize("mode,s", MODES)
def test_a_pull_never_moves_the_clock_so_a_prefetch_cannot_swallow_the_push(mode, s):
    shard, plan = make_shard(mode, s)
    init(shard, plan)
    if mode == "async":
        shard.pull("a", plan.fingerprint, 10**9, ["w#0"])
    assert push(shard, plan, "a", 0, torch.ones(4)).outcome == "APPLIED"
    assert shard.stats()["clocks"] == {"a": 1}


@pytest.mark.parametrize("mode,s", MODES)
def test_a_push_in_parts_survives_an_eviction_between_its_parts(mode, s):
    now = FakeTime()
    shard, plan = make_shard(mode, s, now=now, extra=True)
    init(shard, plan)
    assert first_part(shard, plan).outcome == "BUFFERED"
    now.t = 100.0
    shard.evict_expired()
    shard.register("a", plan.fingerprint)
    assert push(shard, plan, "a", 0, torch.ones(4), part=1, num_parts=2).outcome == "APPLIED"
    assert torch.equal(weights(shard), -torch.ones(4))


def test_a_refused_push_leaves_a_push_in_progress_intact():
    shard, plan = make_shard("sync", extra=True)
    init(shard, plan)
    assert first_part(shard, plan).outcome == "BUFFERED"
    with pytest.raises(StepConflict):
        push(shard, plan, "a", 7, torch.ones(4))
    assert push(shard, plan, "a", 0, torch.ones(4), part=1, num_parts=2).outcome == "APPLIED"
    assert torch.equal(weights(shard), -torch.ones(4))


def test_registering_with_a_clock_aligns_a_worker_and_releases_the_step_it_skips():
    shard, plan = make_shard("sync", num_workers=2)
    init(shard, plan)
    shard.register("b", plan.fingerprint)
    push(shard, plan, "a", 0, torch.ones(4))
    assert shard.register("b", plan.fingerprint, clock=1)["clock"] == 1  # b is at step 1 elsewhere
    assert shard.version == 1
    with pytest.raises(InvalidArgument, match="clock"):
        shard.register("b", plan.fingerprint, clock=-2)


def test_init_from_an_unregistered_worker_is_refused():
    shard, plan = make_shard("async")
    with pytest.raises(UnknownWorker):
        shard.init("x", plan, plan.fingerprint, SGD1, [("w#0", torch.zeros(4))], 0, 1)


def test_a_stopping_server_answers_a_waiting_pull_unavailable_which_clients_retry():
    from ps.errors import Unavailable

    shard, plan = make_shard("sync", num_workers=1)
    init(shard, plan)
    errors = []

    def wait():
        try:
            shard.pull("a", plan.fingerprint, 1, ["w#0"])  # step 0 has not happened: waits
        except Exception as e:  # noqa: BLE001 - inspected below
            errors.append(e)

    t = threading.Thread(target=wait)
    t.start()
    time.sleep(0.2)
    shard.stop()
    t.join(5)
    assert len(errors) == 1 and isinstance(errors[0], Unavailable), errors


def test_progress_eviction_counts_only_time_a_worker_could_have_progressed():
    now = FakeTime()
    shard = Shard(ServerConfig(mode="sync", num_workers=3, worker_timeout=100.0, progress_timeout=2.0), now=now)
    plan = make_plan([ParamSpec("w", (4,))], 1, 1 << 20)
    init(shard, plan)
    shard.register("b", plan.fingerprint)
    assert not shard.ready_or_wait("a", 0, lambda: None)  # a and b wait for the quorum...
    assert not shard.ready_or_wait("b", 0, lambda: None)
    now.t = 3.0
    shard.register("c", plan.fingerprint)  # ...which comes only now: their pulls go through
    assert shard.ready_or_wait("a", 0, lambda: None) and shard.ready_or_wait("b", 0, lambda: None)
    push(shard, plan, "c", 0, torch.ones(4))
    assert not shard.ready_or_wait("c", 1, lambda: None)  # c waits for a and b
    now.t = 4.5
    assert shard.evict_expired() == []  # a and b have computed for 1.5 s only, not 4.5
    shard.register("d", plan.fingerprint)  # another worker joining does not restart their count
    assert not shard.ready_or_wait("c", 1, lambda: None)
    now.t = 5.5
    assert sorted(shard.evict_expired()) == ["a", "b"]  # both blocking c for 2.5 s, in one pass; d is new
    assert shard.stats()["stalled_evictions"] == 2 and shard.version == 0


def test_a_hung_worker_is_evicted_by_progress_even_when_backup_workers_carry_the_steps():
    now = FakeTime()
    shard = Shard(ServerConfig(mode="sync", num_workers=3, backup_workers=1, worker_timeout=100.0,
                               progress_timeout=2.0), now=now)
    plan = make_plan([ParamSpec("w", (4,))], 1, 1 << 20)
    init(shard, plan)
    for w in "bx":
        shard.register(w, plan.fingerprint)
    for w in "abx":
        assert shard.ready_or_wait(w, 0, lambda: None)
    for step in range(4):  # x hangs; a and b go on, each step completing without it
        now.t += 1.0
        for w in "ab":
            assert shard.ready_or_wait(w, step, lambda: None)
            push(shard, plan, w, step, torch.ones(4))
        assert not shard.ready_or_wait("a", step + 2, lambda: None)
        shard.evict_expired()
    stats = shard.stats()
    assert stats["stalled_evictions"] == 1 and sorted(stats["clocks"]) == ["a", "b"] and stats["version"] == 4


def test_an_init_with_nan_or_a_bad_part_is_refused_even_on_an_initialised_shard():
    shard, plan = make_shard("async")
    init(shard, plan)
    with pytest.raises(InvalidArgument, match="NaN"):
        shard.init("a", plan, plan.fingerprint, SGD1, [("w#0", torch.full((4,), float("nan")))], 0, 1)
    with pytest.raises(InvalidArgument, match="part"):
        shard.init("a", plan, plan.fingerprint, SGD1, [("w#0", torch.zeros(4))], 3, 1)
    assert torch.equal(weights(shard), torch.zeros(4)) and shard.stats()["rejected"] == 2


def test_the_quorum_is_remembered_without_keeping_every_id_that_ever_joined():
    shard, plan = make_shard("sync", num_workers=2)
    init(shard, plan)
    shard.register("b", plan.fingerprint)
    shard.leave("b")
    assert shard.ready_or_wait("a", 0, lambda: None)  # the quorum stays reached after b left
    assert not shard._joined


def test_a_shard_restored_after_its_first_update_does_not_wait_for_a_quorum_again():
    shard, plan = make_shard("sync", num_workers=2)
    init(shard, plan)
    shard.register("b", plan.fingerprint)
    for w in "ab":
        push(shard, plan, w, 0, torch.ones(4))
    shard.leave("b")  # b's id may be forgotten later: the snapshot cannot prove the quorum by ids
    snap = shard.snapshot()
    snap.clocks.pop("b")
    restored, _ = make_shard("sync", num_workers=2)
    restored.restore(snap)
    restored.register("a", plan.fingerprint, clock=1)
    assert restored.ready_or_wait("a", 1, lambda: None)


@pytest.mark.parametrize("no_grad, error, match", [
    (["x#0"], UnknownKey, "no-gradient key 'x#0'"),
    (["w#0"], InvalidArgument, "'w#0' is named as having no gradient and appears in the push again"),
    (["u#0", "u#0"], InvalidArgument, "'u#0' is named as having no gradient and appears in the push again"),
])
def test_bad_no_gradient_keys_are_refused_and_change_nothing(no_grad, error, match):
    shard, plan = make_shard("async", extra=True)
    init(shard, plan)
    with pytest.raises(error, match=match):
        shard.push("a", plan.fingerprint, 0, 0, [("w#0", torch.ones(4))], 0, 1, no_grad=no_grad)
    assert shard.version == 0 and torch.equal(weights(shard), torch.zeros(4))
    assert shard.push("a", plan.fingerprint, 0, 0, [("w#0", torch.ones(4))], 0, 1, no_grad=["u#0"]).outcome == "APPLIED"


def test_a_sync_step_of_keys_without_gradients_is_taken_and_steps_nothing():
    shard, plan = make_shard("sync", num_workers=2, extra=True)
    init(shard, plan)
    shard.register("b", plan.fingerprint)
    for worker in ("a", "b"):
        shard.push(worker, plan.fingerprint, 0, 0, [], 0, 1, no_grad=["w#0", "u#0"])
    assert shard.version == 1 and torch.equal(weights(shard), torch.zeros(4))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_shard_restarted_empty_takes_the_highest_version_workers_read_and_counts_the_rest_lost(mode):
    shard, plan = make_shard(mode, num_workers=2)
    shard.register("a", plan.fingerprint, clock=5, seen_version=5)
    shard.register("b", plan.fingerprint, clock=6, seen_version=6)
    # "a" sends the weights it holds, read at version 5: "b" had read version 6, so one update is lost
    shard.init("a", plan, plan.fingerprint, SGD1, [("w#0", torch.full((4,), 2.0))], 0, 1, version=5)
    stats = shard.stats()
    assert (stats["version"], stats["lost_updates"], stats["reinitialized"]) == (6, 1, 1)
    assert torch.equal(weights(shard), torch.full((4,), 2.0))
    # a worker registering later that had read more catches the shard up, as after a restore
    shard.register("c", plan.fingerprint, clock=8, seen_version=8)
    assert (shard.stats()["version"], shard.stats()["lost_updates"]) == (8, 3)


def test_a_fresh_init_is_not_a_reinitialisation():
    shard, plan = make_shard("sync")
    init(shard, plan)
    assert (shard.stats()["version"], shard.stats()["reinitialized"], shard.stats()["lost_updates"]) == (0, 0, 0)


def _group_shard(mode, now=None, num_workers=1, **cfg):
    """A shard of two one-slice keys, "a" (member 0's) and "b" (member 1's), initialised by "g"."""
    shard = Shard(ServerConfig(mode=mode, num_workers=num_workers, worker_timeout=5.0, **cfg), now=now or time.monotonic)
    plan = make_plan([ParamSpec("a", (4,)), ParamSpec("b", (4,))], 1, 1 << 20)
    shard.register("g", plan.fingerprint)
    shard.init("g", plan, plan.fingerprint, SGD1, [("a#0", torch.zeros(4)), ("b#0", torch.zeros(4))], 0, 1)
    return shard, plan


def _member_push(shard, plan, member, clock=0, key=None):
    key = key or ("a#0", "b#0")[member]
    return shard.push("g", plan.fingerprint, clock, 0, [(key, torch.ones(4))], 0, 1, member=member, members=2)


def test_a_member_of_an_evicted_group_is_told_to_register_again_and_then_hears_the_outcome():
    now = FakeTime()
    shard, plan = _group_shard("async", now)
    assert _member_push(shard, plan, 0).wait
    now.t = 10.0
    shard.evict_expired()  # the group went silent: evicted, its half-built push kept a lease
    with pytest.raises(UnknownWorker):
        shard.push_outcome_or_wait("g", 0, lambda: None)
    shard.register("g", plan.fingerprint)
    assert _member_push(shard, plan, 0).outcome == "DUPLICATE"  # its part is still held
    result = _member_push(shard, plan, 1)
    assert result.outcome == "APPLIED" and result.version == 1
    assert shard.push_outcome_or_wait("g", 0, lambda: None) == result  # the same outcome for member 0


@pytest.mark.parametrize("mode, staleness", [("sync", 0), ("ssp", 2)])
def test_a_group_waiting_for_its_own_members_is_not_evicted_as_stalled(mode, staleness):
    now = FakeTime()
    shard, plan = _group_shard(mode, now, progress_timeout=1.0, staleness=staleness)
    assert _member_push(shard, plan, 0).wait
    assert shard.push_outcome_or_wait("g", 0, lambda: None) is None  # waits for member 1
    now.t = 3.0
    shard.heartbeat("g")
    assert shard.evict_expired() == [] and shard.stats()["evictions"] == 0


def test_a_member_waiting_for_a_push_its_worker_was_placed_past_is_answered_evicted():
    shard, plan = _group_shard("async")
    assert _member_push(shard, plan, 0).wait
    shard.register("g", plan.fingerprint, clock=3)  # aligned to a later clock by another shard
    assert _member_push(shard, plan, 1).outcome == "EVICTED"
    assert shard.push_outcome_or_wait("g", 0, lambda: None).outcome == "EVICTED"
    assert shard.pending_bytes == 0 and shard.stats()["version"] == 0


def test_a_key_sent_by_two_members_is_refused_at_the_repeating_part():
    shard, plan = _group_shard("async")
    assert _member_push(shard, plan, 0).wait
    woken = []
    assert shard.push_outcome_or_wait("g", 0, lambda: woken.append(1)) is None
    with pytest.raises(InvalidArgument, match="already sent by another part"):
        _member_push(shard, plan, 1, key="a#0")
    assert _member_push(shard, plan, 1).outcome == "APPLIED"  # the push is intact; its right part completes it
    assert woken and shard.push_outcome_or_wait("g", 0, lambda: None).outcome == "APPLIED"
    assert torch.equal(weights_of(shard, "a#0"), -torch.ones(4)) and torch.equal(weights_of(shard, "b#0"), -torch.ones(4))


def weights_of(shard, key):
    (_, data), = shard.pull("", shard.plan.fingerprint, 0, [key])[0]
    return torch.frombuffer(bytearray(data), dtype=torch.float32)


@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_a_shard_reinitialised_with_fewer_workers_back_than_its_quorum_goes_on_after_a_lease(mode):
    now = FakeTime()
    shard = Shard(ServerConfig(mode=mode, num_workers=2, worker_timeout=5.0), now=now)
    plan = make_plan([ParamSpec("w", (4,))], 1, 1 << 20)
    shard.register("a", plan.fingerprint, clock=4, seen_version=4)  # the other worker had finished
    shard.init("a", plan, plan.fingerprint, SGD1, [("w#0", torch.zeros(4))], 0, 1, version=4)
    assert not shard.ready_or_wait("a", 4 if mode == "sync" else 7, lambda: None)
    now.t = 6.0
    shard.heartbeat("a")
    shard.evict_expired()
    assert shard.ready_or_wait("a", 4, lambda: None)
    assert shard.push("a", plan.fingerprint, 4, 4, [("w#0", torch.ones(4))], 0, 1).outcome == "APPLIED"


def test_a_sync_shard_reinitialised_behind_every_worker_skips_the_step_none_will_push():
    shard = Shard(ServerConfig(mode="sync", num_workers=1, worker_timeout=5.0))
    plan = make_plan([ParamSpec("w", (4,))], 1, 1 << 20)
    shard.register("a", plan.fingerprint, clock=4, seen_version=3)  # it pushed step 3, read version 3
    shard.init("a", plan, plan.fingerprint, SGD1, [("w#0", torch.zeros(4))], 0, 1, version=3)
    assert shard.stats()["version"] == 4 and shard.ready_or_wait("a", 4, lambda: None)


def test_a_stray_client_claiming_a_higher_version_does_not_move_a_healthy_shard():
    now = FakeTime()
    shard, plan = make_shard("sync", num_workers=1, now=now)
    init(shard, plan)
    now.t = 10.0  # past the lease after init in which a restart nobody told the shard of is caught up
    shard.push("a", plan.fingerprint, 0, 0, [("w#0", torch.ones(4))], 0, 1)
    shard.register("stray", plan.fingerprint, seen_version=1000)
    assert (shard.stats()["version"], shard.stats()["lost_updates"]) == (1, 0)


def test_a_fresh_init_by_a_worker_back_first_is_caught_up_by_the_others_within_a_lease():
    now = FakeTime()
    shard, plan = make_shard("sync", num_workers=2, now=now)
    init(shard, plan)  # a restarted worker, back first with the initial weights, at version 0
    shard.register("b", plan.fingerprint, clock=7, seen_version=7)
    assert (shard.stats()["version"], shard.stats()["lost_updates"]) == (7, 7)


def test_a_member_of_a_group_that_left_is_answered_evicted_and_does_not_revive_it():
    shard, plan = _group_shard("async")
    assert _member_push(shard, plan, 0).wait
    shard.leave("g")
    assert shard.push_outcome_or_wait("g", 0, lambda: None).outcome == "EVICTED"
    assert shard.stats()["clocks"] == {}
