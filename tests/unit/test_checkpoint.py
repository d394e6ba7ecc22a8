"""Checkpoints: a restored shard equals the one saved (optimizer state included), writes are
atomic, a corrupted newest checkpoint falls back to the previous one, and a restored sync shard
learns from its workers' clocks which steps it lost."""

import json
import logging
import os

import pytest
import torch

from ps.config import OptimizerConfig, ServerConfig
from ps.server import checkpoint
from ps.server.checkpoint import CheckpointError
from ps.server.shard import Shard
from ps.sharding import ParamSpec, make_plan

OPTIMIZERS = [OptimizerConfig("sgd", lr=0.5), OptimizerConfig("momentum", lr=0.1, momentum=0.9),
              OptimizerConfig("adam", lr=0.01, weight_decay=0.01)]


def trained_shard(mode, optimizer, steps=3, workers=("a",)):
    shard = Shard(ServerConfig(mode=mode, num_workers=len(workers)))
    plan = make_plan([ParamSpec("w", (6,)), ParamSpec("b", (2,))], 1, 1 << 20)
    for w in workers:
        shard.register(w, plan.fingerprint)
    shard.init(workers[0], plan, plan.fingerprint, optimizer,
               [("w#0", torch.arange(6.0)), ("b#0", torch.ones(2))], 0, 1)
    for step in range(steps):
        for k, w in enumerate(workers):
            grads = [("w#0", torch.linspace(-1, 1, 6) * (step + k + 1)), ("b#0", torch.full((2,), 0.5))]
            shard.push(w, plan.fingerprint, step, shard.version, grads, 0, 1)
    return shard, plan


def weights(shard):
    return {k: torch.frombuffer(bytearray(d), dtype=torch.float32)
            for k, d in shard.pull("", shard.plan.fingerprint, 0, ["w#0", "b#0"])[0]}


def restored(tmp_path, shard):
    checkpoint.save(str(tmp_path), shard.snapshot())
    cfg = shard.cfg
    new = Shard(cfg)
    new.restore(checkpoint.load_latest(str(tmp_path), cfg.shard_id, cfg.num_shards, cfg.mode))
    return new


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: o.name)
@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_a_restored_shard_continues_exactly_like_the_one_saved(tmp_path, mode, optimizer):
    shard, plan = trained_shard(mode, optimizer)
    new = restored(tmp_path, shard)
    assert new.version == shard.version and new.plan.fingerprint == plan.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(weights(shard).values(), weights(new).values()))
    for s in (shard, new):  # the optimizer state came back too: the next update is identical
        s.register("a", plan.fingerprint, 3)
        s.push("a", plan.fingerprint, 3, s.version, [("w#0", torch.ones(6)), ("b#0", -torch.ones(2))], 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(weights(shard).values(), weights(new).values()))
    assert new.stats()["pushes"] == shard.stats()["pushes"]


def test_the_files_are_safetensors_and_json_and_only_the_newest_two_stay(tmp_path):
    shard, plan = trained_shard("async", OPTIMIZERS[1], steps=1)
    for step in range(1, 4):
        shard.push("a", plan.fingerprint, step, shard.version, [("w#0", torch.ones(6))], 0, 1)
        checkpoint.save(str(tmp_path), shard.snapshot())
    names = sorted(os.listdir(tmp_path))
    assert names == ["shard-0-v000000000003.json", "shard-0-v000000000003.safetensors",
                     "shard-0-v000000000004.json", "shard-0-v000000000004.safetensors"]
    manifest = json.loads((tmp_path / names[2]).read_text())
    assert manifest["version"] == 4 and manifest["clocks"] == {"a": 4} and manifest["optimizer"]["name"] == "momentum"
    with open(tmp_path / names[3], "rb") as f:
        header = f.read(8)  # safetensors: a little-endian header length, then JSON
    assert int.from_bytes(header, "little") < 10_000


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete-tensors", "bad-json"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage, caplog):
    shard, plan = trained_shard("async", OPTIMIZERS[0], steps=1)
    checkpoint.save(str(tmp_path), shard.snapshot())
    good = weights(shard)
    shard.push("a", plan.fingerprint, 1, shard.version, [("w#0", torch.ones(6))], 0, 1)
    checkpoint.save(str(tmp_path), shard.snapshot())
    newest = tmp_path / "shard-0-v000000000002.safetensors"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        newest.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "delete-tensors":
        newest.unlink()
    else:
        (tmp_path / "shard-0-v000000000002.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="ps.server"):
        snap = checkpoint.load_latest(str(tmp_path), 0, 1, "async")
    assert snap.version == 1
    assert "shard-0-v000000000002.json is unusable" in caplog.text
    new = Shard(shard.cfg)
    new.restore(snap)
    assert all(torch.equal(a, b) for a, b in zip(good.values(), weights(new).values()))


def test_a_damaged_checkpoint_is_quarantined_and_pruning_keeps_two_good_ones(tmp_path, caplog):
    shard, plan = trained_shard("async", OPTIMIZERS[0], steps=1)
    checkpoint.save(str(tmp_path), shard.snapshot())
    shard.push("a", plan.fingerprint, 1, shard.version, [("w#0", torch.ones(6))], 0, 1)
    checkpoint.save(str(tmp_path), shard.snapshot())
    (tmp_path / "shard-0-v000000000002.safetensors").write_bytes(b"\0" * 10)
    with caplog.at_level(logging.WARNING, logger="ps.server"):
        assert checkpoint.load_latest(str(tmp_path), 0, 1, "async").version == 1
    assert "renamed to shard-0-v000000000002.json.corrupt" in caplog.text
    later, _ = trained_shard("async", OPTIMIZERS[0], steps=5)  # the restored shard went on to version 5
    checkpoint.save(str(tmp_path), later.snapshot())
    assert sorted(os.listdir(tmp_path)) == [
        "shard-0-v000000000001.json", "shard-0-v000000000001.safetensors",
        "shard-0-v000000000002.json.corrupt", "shard-0-v000000000002.safetensors.corrupt",
        "shard-0-v000000000005.json", "shard-0-v000000000005.safetensors"]
    assert [os.path.basename(c) for c in checkpoint.candidates(str(tmp_path), 0)] == [
        "shard-0-v000000000005.json", "shard-0-v000000000001.json"]


def test_a_checkpoint_that_only_does_not_fit_this_server_is_left_as_it_is(tmp_path):
    shard, _ = trained_shard("sync", OPTIMIZERS[0], steps=1)
    checkpoint.save(str(tmp_path), shard.snapshot())
    with pytest.raises(CheckpointError, match="in mode 'sync'"):
        checkpoint.load_latest(str(tmp_path), 0, 1, "async")
    assert checkpoint.load_latest(str(tmp_path), 0, 1, "sync").version == 1


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint of shard 0"):
        checkpoint.load_latest(str(tmp_path), 0, 1, "sync")
    shard, _ = trained_shard("sync", OPTIMIZERS[0], steps=1)
    checkpoint.save(str(tmp_path), shard.snapshot())
    (tmp_path / "shard-0-v000000000001.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match="no usable checkpoint.*truncated or corrupted"):
        checkpoint.load_latest(str(tmp_path), 0, 1, "sync")


def test_a_checkpoint_of_another_shard_or_mode_is_refused(tmp_path):
    shard, _ = trained_shard("sync", OPTIMIZERS[0], steps=1)
    checkpoint.save(str(tmp_path), shard.snapshot())
    with pytest.raises(CheckpointError, match="in mode 'sync', but this server is shard 0/1 in mode 'async'"):
        checkpoint.load_latest(str(tmp_path), 0, 1, "async")


def test_a_half_written_checkpoint_does_not_exist(tmp_path):
    shard, _ = trained_shard("async", OPTIMIZERS[0], steps=1)
    checkpoint.save(str(tmp_path), shard.snapshot())
    (tmp_path / "shard-0-v000000000009.safetensors.tmp").write_bytes(b"partial")  # a crash mid-write
    assert checkpoint.load_latest(str(tmp_path), 0, 1, "async").version == 1


def test_a_restored_sync_shard_skips_the_steps_its_workers_are_past(tmp_path):
    shard, plan = trained_shard("sync", OPTIMIZERS[0], steps=2, workers=("a", "b"))
    assert shard.version == 2
    new = restored(tmp_path, shard)
    assert new.stats()["active_workers"] == 0  # everyone must register again
    # The old shard went on to step 5 before it died: "a" pushed step 5 and waits for step 6,
    # "b" is about to push step 5.
    assert new.register("a", plan.fingerprint, 6, seen_version=5)["clock"] == 6
    assert new.version == 5 and new.stats()["lost_updates"] == 3
    assert new.register("b", plan.fingerprint, 5, seen_version=5)["clock"] == 5
    r = new.push("b", plan.fingerprint, 5, 5, [("w#0", torch.ones(6)), ("b#0", torch.ones(2))], 0, 1)
    assert r.outcome == "APPLIED" and new.version == 6  # step 5 completes with b's gradient alone


def test_in_normal_operation_registering_again_never_moves_a_sync_shard(tmp_path):
    shard, plan = trained_shard("sync", OPTIMIZERS[0], steps=2, workers=("a", "b"))
    shard.push("a", plan.fingerprint, 2, 2, [("w#0", torch.ones(6)), ("b#0", torch.ones(2))], 0, 1)
    shard.leave("a")
    shard.register("a", plan.fingerprint, 3, seen_version=2)  # a pushed step 2, waits for step 3
    assert shard.version == 2 and shard.stats()["lost_updates"] == 0


def test_restore_if_present_starts_fresh_without_a_checkpoint_and_restores_with_one(tmp_path):
    from ps.server.app import create_server

    cfg = ServerConfig(mode="async", checkpoint_dir=str(tmp_path), restore_if_present=True)
    srv = create_server(cfg)
    try:
        assert srv.shard.version == 0 and not srv.shard.store.initialized
    finally:
        srv.stop(grace=0)
    shard, _ = trained_shard("async", OPTIMIZERS[0], steps=2)
    checkpoint.save(str(tmp_path), shard.snapshot())
    srv = create_server(cfg)
    try:
        assert srv.shard.version == 2
    finally:
        srv.stop(grace=0)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_a_sync_step_half_summed_at_the_checkpoint_completes_with_both_gradients_after_a_restore(tmp_path):
    shard, plan = trained_shard("sync", OPTIMIZERS[0], steps=2, workers=("a", "b"))
    g_a, g_b = [("w#0", torch.ones(6)), ("b#0", torch.ones(2))], [("w#0", 3 * torch.ones(6)), ("b#0", -torch.ones(2))]
    shard.push("a", plan.fingerprint, 2, 2, g_a, 0, 1)  # a's gradient for step 2 is in the partial sum
    new = restored(tmp_path, shard)
    shard.push("b", plan.fingerprint, 2, 2, g_b, 0, 1)
    new.register("a", plan.fingerprint, 3, seen_version=2)  # a waits for step 3, b comes back to push 2
    new.register("b", plan.fingerprint, 2, seen_version=2)
    assert new.push("b", plan.fingerprint, 2, 2, g_b, 0, 1).outcome == "APPLIED"
    assert new.version == shard.version == 3 and new.stats()["lost_updates"] == 0
    assert all(torch.equal(x, y) for x, y in zip(weights(shard).values(), weights(new).values()))


def test_after_a_restore_sync_steps_wait_for_the_checkpointed_workers_for_one_lease(tmp_path):
    shard, plan = trained_shard("sync", OPTIMIZERS[0], steps=2, workers=("a", "b"))
    checkpoint.save(str(tmp_path), shard.snapshot())
    clock = Clock()
    new = Shard(shard.cfg, now=clock)
    new.restore(checkpoint.load_latest(str(tmp_path), 0, 1, "sync"))
    new.register("a", plan.fingerprint, 2, seen_version=2)
    grads = [("w#0", torch.ones(6)), ("b#0", torch.ones(2))]
    assert new.push("a", plan.fingerprint, 2, 2, grads, 0, 1).outcome == "ACCUMULATED"  # b is awaited
    assert new.version == 2
    clock.t += new.cfg.worker_timeout + 1  # b never comes back: after one lease the shard goes on
    new.evict_expired()
    assert new.version == 3


def test_only_workers_the_checkpoint_knew_can_move_a_restored_shard(tmp_path):
    shard, plan = trained_shard("async", OPTIMIZERS[0], steps=2)
    new = restored(tmp_path, shard)
    new.register("stranger", plan.fingerprint, 0, seen_version=10**6)
    assert new.version == 2 and new.stats()["lost_updates"] == 0


def test_a_fresh_server_refuses_a_directory_with_an_earlier_runs_checkpoints(tmp_path):
    from ps.server.app import create_server

    shard, _ = trained_shard("async", OPTIMIZERS[0], steps=1)
    checkpoint.save(str(tmp_path), shard.snapshot())
    with pytest.raises(CheckpointError, match="from an earlier run .* --restore or --restore-if-present"):
        create_server(ServerConfig(mode="async", checkpoint_dir=str(tmp_path)))


def test_a_step_whose_gradients_were_all_lost_in_a_restart_is_skipped_not_waited_for_forever(tmp_path):
    shard, plan = trained_shard("sync", OPTIMIZERS[0], steps=2, workers=("a", "b"))
    checkpoint.save(str(tmp_path), shard.snapshot())  # version 2, no partial sum
    clock = Clock()
    new = Shard(shard.cfg, now=clock)
    new.restore(checkpoint.load_latest(str(tmp_path), 0, 1, "sync"))
    # a had pushed step 2 to the server that died (lost) and waits for step 3; b never comes back
    new.register("a", plan.fingerprint, 3, seen_version=2)
    assert new.version == 2
    clock.t += new.cfg.worker_timeout + 1
    new.evict_expired()
    assert new.version == 3 and new.stats()["lost_updates"] == 1
