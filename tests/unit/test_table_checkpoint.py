"""Checkpoints of server-held tables: written and read in chunks, each checked against its
digest; a restored shard's tables continue exactly like the ones saved."""

import os

import numpy as np
import pytest
import torch

from ps.config import OptimizerConfig, ServerConfig
from ps.server import checkpoint
from ps.server.shard import Shard
from ps.server.table import RowsIn
from ps.sharding import ParamSpec, make_plan
from ps.tables import TableSpec

SPECS = [TableSpec("a", 4, optimizer="lazy_adam", lr=0.1, admit_after=2, evict_after=50),
         TableSpec("b", 3, optimizer="rowwise_adagrad", lr=0.2, max_rows=300)]


def shard_with_tables(mode="sync", workers=("w0", "w1"), steps=4, chunk=1 << 20):
    shard = Shard(ServerConfig(mode=mode, num_workers=len(workers), checkpoint_chunk_bytes=chunk))
    plan = make_plan([ParamSpec("p", (2,))], 1, 1 << 20)
    for w in workers:
        shard.register(w, plan.fingerprint)
    shard.init(workers[0], plan, plan.fingerprint, OptimizerConfig("sgd", lr=0.1), [("p#0", torch.zeros(2))], 0, 1)
    shard.tables.declare(SPECS)
    rng = np.random.default_rng(0)
    for step in range(steps):
        for w in workers:
            push(shard, w, step, rng)
    return shard


def push(shard, worker, clock, rng, n=400):
    entries = []
    for spec in SPECS:
        ids = np.unique(rng.integers(0, 3000, n))
        entries.append(RowsIn(spec.name, ids, torch.from_numpy(rng.standard_normal((len(ids), spec.dim)).astype(np.float32))))
    return shard.tables.push(worker, clock, shard.tables.version, entries)


def rows(shard):
    probe = np.arange(3000, dtype=np.int64)
    return [shard.tables.read([RowsIn(s.name, probe, None)])[0][0] for s in SPECS]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_restored_tables_continue_exactly_like_the_ones_saved(tmp_path, mode):
    # 3 steps and a half: in sync mode one worker's push of step 3 is a partial sum, saved too
    shard = shard_with_tables(mode, steps=3)
    push(shard, "w0", 3, np.random.default_rng(9))
    checkpoint.save(str(tmp_path), shard.snapshot(), shard.tables, 16 << 10)  # 16 KiB chunks: many files
    chunks = [n for n in os.listdir(tmp_path) if "-t0-r" in n]
    assert len(chunks) > 1
    new = Shard(shard.cfg)
    new.restore(checkpoint.load_latest(str(tmp_path), 0, 1, mode))
    assert all(torch.equal(a, b) for a, b in zip(rows(shard), rows(new)))
    assert new.tables.stats() == shard.tables.stats()
    for s in (shard, new):  # optimizer state, admission counts and clocks came back: the next steps match
        for w in ("w0", "w1"):  # (sync: w0's push of step 3 is in the saved partial sum: a duplicate)
            s.register(w, s.plan.fingerprint)
            push(s, w, 3, np.random.default_rng(5))
        for w in ("w0", "w1"):
            push(s, w, 4, np.random.default_rng(6))
    assert all(torch.equal(a, b) for a, b in zip(rows(shard), rows(new)))
    assert new.tables.stats() == shard.tables.stats()
    assert new.tables.version == shard.tables.version == (5 if mode == "sync" else 10)


def test_a_damaged_chunk_falls_back_to_the_previous_checkpoint(tmp_path):
    shard = shard_with_tables("async", steps=2)
    checkpoint.save(str(tmp_path), shard.snapshot(), shard.tables, 16 << 10)
    before = rows(shard)
    push(shard, "w0", 2, np.random.default_rng(3))
    shard.push("w0", shard.plan.fingerprint, 2, shard.version, [("p#0", torch.ones(2))], 0, 1)  # a newer version
    newest = checkpoint.save(str(tmp_path), shard.snapshot(), shard.tables, 16 << 10)
    prefix = os.path.basename(newest)[:-len(".json")]
    victim, = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path) if n.startswith(prefix) and n.endswith("-t1-r0.safetensors")]
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff\xff")
    new = Shard(shard.cfg)
    new.restore(checkpoint.load_latest(str(tmp_path), 0, 1, "async"))
    assert all(torch.equal(a, b) for a, b in zip(before, rows(new)))
    assert os.path.exists(victim + ".corrupt")


def test_a_failed_save_at_the_same_version_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    shard = shard_with_tables("async", steps=2)
    checkpoint.save(str(tmp_path), shard.snapshot(), shard.tables, 16 << 10)
    before = rows(shard)
    push(shard, "w0", 2, np.random.default_rng(3))  # the tables move; the dense version does not
    real_write, writes = checkpoint._write, []

    def failing(path, data):  # the disk fills up at the end of the second save (its manifest)
        writes.append(path)
        if path.endswith(".json"):
            raise OSError(28, "No space left on device")
        real_write(path, data)

    monkeypatch.setattr(checkpoint, "_write", failing)
    with pytest.raises(OSError):
        checkpoint.save(str(tmp_path), shard.snapshot(), shard.tables, 16 << 10)
    monkeypatch.setattr(checkpoint, "_write", real_write)
    new = Shard(shard.cfg)
    new.restore(checkpoint.load_latest(str(tmp_path), 0, 1, "async"))
    assert all(torch.equal(a, b) for a, b in zip(before, rows(new)))
    checkpoint.save(str(tmp_path), shard.snapshot(), shard.tables, 16 << 10)  # a later save cleans up after it
    new = Shard(shard.cfg)
    new.restore(checkpoint.load_latest(str(tmp_path), 0, 1, "async"))
    assert all(torch.equal(a, b) for a, b in zip(rows(shard), rows(new)))
    manifest = [n for n in os.listdir(tmp_path) if n.endswith(".json")]
    assert len(manifest) == 1
    named = open(os.path.join(tmp_path, manifest[0])).read()
    assert all(n in named for n in os.listdir(tmp_path) if "-t" in n)


def test_old_checkpoints_take_their_chunks_with_them(tmp_path):
    shard = shard_with_tables("async", steps=1)
    for clock in range(1, 5):
        push(shard, "w0", clock, np.random.default_rng(clock))
        shard.push("w0", shard.plan.fingerprint, clock - 1, shard.version, [("p#0", torch.ones(2))], 0, 1)
        checkpoint.save(str(tmp_path), shard.snapshot(), shard.tables, 16 << 10)
    versions = {n.split("-")[2][:13] for n in os.listdir(tmp_path)}
    assert len(versions) == checkpoint.KEEP


def test_a_sync_push_for_a_later_step_waits_for_its_step_and_is_saved(tmp_path):
    shard = Shard(ServerConfig(mode="sync", num_workers=2))
    plan = make_plan([ParamSpec("p", (2,))], 1, 1 << 20)
    for w in ("w0", "w1"):
        shard.register(w, plan.fingerprint)
    shard.init("w0", plan, plan.fingerprint, OptimizerConfig("sgd", lr=0.1), [("p#0", torch.zeros(2))], 0, 1)
    shard.tables.declare([TableSpec("t", 2, init="zeros", lr=1.0)])

    def rows_in(value):
        return [RowsIn("t", np.array([4], np.int64), torch.full((1, 2), value))]

    t = shard.tables
    assert t.push("w0", 0, 0, rows_in(1.0))[0] == "ACCUMULATED"
    assert t.push("w0", 1, 0, rows_in(10.0))[0] == "ACCUMULATED"  # its batch read nothing here at step 1
    assert t.version == 0
    checkpoint.save(str(tmp_path), shard.snapshot(), t, 1 << 20)
    new = Shard(shard.cfg)
    new.restore(checkpoint.load_latest(str(tmp_path), 0, 1, "sync"))
    for s in (shard, new):
        s.register("w0", plan.fingerprint)
        s.register("w1", plan.fingerprint)
        assert s.tables.push("w0", 1, 0, rows_in(10.0))[0] == "DUPLICATE"
        s.tables.push("w1", 0, 0, rows_in(3.0))
        assert s.tables.version == 1  # step 0: (1 + 3) / 2
        s.tables.push("w1", 1, 0, rows_in(30.0))
        assert s.tables.version == 2  # step 1: (10 + 30) / 2
        values = s.tables.read([RowsIn("t", np.array([4], np.int64), None)])[0][0]
        assert values.tolist() == [[-22.0, -22.0]]
