"""Server-held tables without servers: the id index, row storage, sparse optimizers against torch's,
admission and eviction on scripted id streams."""

import numpy as np
import pytest
import torch

from ps.errors import InvalidArgument
from ps.server.table import IdIndex, Table, coalesce
from ps.tables import TableSpec, init_rows, init_table, shard_of


def test_index_matches_a_dict_through_inserts_and_removals():
    rng = np.random.default_rng(0)
    index, truth = IdIndex(), {}
    for round_ in range(30):
        fresh = np.unique(rng.integers(-(1 << 62), 1 << 62, 700))
        fresh = np.array([i for i in fresh if i not in truth], np.int64)
        vals = rng.integers(0, 1 << 40, len(fresh))
        index.insert(fresh, vals)
        truth.update(zip(fresh.tolist(), vals.tolist()))
        if round_ % 3 == 2:  # remove a third
            gone = np.array(list(truth)[::3], np.int64)
            _, slots = index.find(gone)
            assert (slots >= 0).all()
            index.remove_slots(slots)
            for i in gone.tolist():
                del truth[i]
        probe = np.concatenate([np.array(list(truth), np.int64), rng.integers(0, 1 << 62, 500)])
        found, _ = index.find(probe)
        assert found.tolist() == [truth.get(i, -1) for i in probe.tolist()]
        assert len(index) == len(truth)


def test_index_colliding_ids_in_one_batch():
    index = IdIndex(1024)
    ids = np.arange(0, 400, dtype=np.int64) * 1024  # many share low bits before mixing
    index.insert(ids, ids * 2)
    assert (index.find(ids)[0] == ids * 2).all()


def test_init_is_deterministic_per_id_and_seed():
    spec = TableSpec("t", 8, seed=3)
    a = init_rows(spec, np.array([5, 7, 1 << 60], np.int64))
    b = init_rows(spec, np.array([1 << 60, 5], np.int64))
    assert torch.equal(a[2], b[0]) and torch.equal(a[0], b[1])
    assert not torch.equal(a[0], init_rows(TableSpec("t", 8, seed=4), np.array([5], np.int64))[0])
    big = init_table(TableSpec("t", 16), 20000)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 0.25) < 0.01  # std 1/sqrt(16)
    u = init_table(TableSpec("t", 16, init="uniform", init_scale=0.5), 20000)
    assert float(u.min()) >= -0.5 and float(u.max()) < 0.5


def test_placement_spreads_consecutive_ids():
    counts = np.bincount(shard_of(np.arange(100000, dtype=np.int64), 3), minlength=3)
    assert counts.min() > 32000


def _torch_reference(optimizer: str, spec: TableSpec, weight: torch.Tensor):
    emb = torch.nn.Embedding.from_pretrained(weight.clone(), freeze=False, sparse=True)
    if optimizer == "sgd":
        opt = torch.optim.SGD(emb.parameters(), lr=spec.lr)
    elif optimizer == "adagrad":
        opt = torch.optim.Adagrad(emb.parameters(), lr=spec.lr)
    else:
        opt = torch.optim.SparseAdam(emb.parameters(), lr=spec.lr)
    return emb, opt


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "lazy_adam"])
def test_sparse_optimizers_equal_torch(optimizer):
    vocab, dim = 50, 4
    spec = TableSpec("t", dim, optimizer=optimizer, lr=0.05)
    emb, opt = _torch_reference(optimizer, spec, init_table(spec, vocab))
    table = Table(spec)
    gen = torch.Generator().manual_seed(0)
    for step in range(1, 8):
        ids = torch.randint(0, vocab, (12,), generator=gen)
        target = torch.randn(12, dim, generator=gen)
        opt.zero_grad()
        ((emb(ids) - target) ** 2).sum().backward()
        opt.step()
        uniq, inverse = torch.unique(ids, return_inverse=True)
        rows = torch.from_numpy(table.read(uniq.numpy()).numpy()).requires_grad_()
        ((rows[inverse] - target) ** 2).sum().backward()
        table.apply(step, uniq.numpy(), rows.grad, np.ones(len(uniq), np.int64))
    touched = np.arange(vocab, dtype=np.int64)
    assert torch.allclose(table.read(touched), emb.weight.detach(), atol=1e-6, rtol=0)


def test_rowwise_adagrad_by_hand():
    spec = TableSpec("t", 3, optimizer="rowwise_adagrad", lr=0.1)
    table = Table(spec)
    ids = np.array([4, 9], np.int64)
    w = init_rows(spec, ids)
    acc = torch.zeros(2)
    for step in range(1, 4):
        g = torch.full((2, 3), float(step)) * torch.tensor([[1.0], [-2.0]])
        table.apply(step, ids, g, np.ones(2, np.int64))
        acc += g.pow(2).mean(1)
        w -= (0.1 / (acc.sqrt() + 1e-8)).unsqueeze(1) * g
    assert torch.allclose(table.read(ids), w, atol=1e-6)


def test_admission_counts_pushes_and_drops_gradients_until_admitted():
    spec = TableSpec("t", 2, admit_after=3, init="zeros", lr=1.0)
    table = Table(spec)
    one = np.ones(1, np.int64)
    for v in (1, 2):
        table.apply(v, np.array([7], np.int64), torch.ones(1, 2), one)
        assert table.rows == 0 and torch.equal(table.read(np.array([7], np.int64)), torch.zeros(1, 2))
    table.apply(3, np.array([7], np.int64), torch.ones(1, 2), one)  # the third push creates it and steps it
    assert table.rows == 1 and torch.equal(table.read(np.array([7], np.int64)), -torch.ones(1, 2))
    s = table.stats()
    assert (s["created"], s["admission_dropped"], s["pending"]) == (1, 2, 0)
    table.apply(4, np.array([8], np.int64), torch.ones(1, 2), np.array([3], np.int64))  # three pushes at once
    assert table.rows == 2


def test_idle_rows_are_evicted_and_read_as_init_again():
    spec = TableSpec("t", 2, evict_after=2, lr=1.0)
    table = Table(spec)
    a, b = np.array([1], np.int64), np.array([2], np.int64)
    g = torch.ones(1, 2)
    table.apply(1, a, g, np.ones(1, np.int64))
    table.apply(2, b, g, np.ones(1, np.int64))  # a untouched for 1 update: kept
    assert table.rows == 2
    table.apply(3, b, g, np.ones(1, np.int64))  # a untouched for 2: evicted
    assert table.rows == 1 and table.stats()["evicted_idle"] == 1
    assert torch.equal(table.read(a), init_rows(spec, a))
    table.idle(4)
    table.idle(5)  # b last touched at 3: evicted at 5
    assert table.rows == 0 and table.stats()["evicted_idle"] == 2


def test_row_cap_evicts_least_recently_updated():
    spec = TableSpec("t", 2, max_rows=3, lr=1.0)
    table = Table(spec)
    for v, i in enumerate([10, 11, 12, 10, 13], start=1):
        table.apply(v, np.array([i], np.int64), torch.ones(1, 2), np.ones(1, np.int64))
    ids, _ = table.live_rows()
    assert sorted(ids.tolist()) == [10, 12, 13] and table.stats()["evicted_lru"] == 1
    table.apply(6, np.array([20, 21, 22, 23], np.int64), torch.ones(4, 2), np.ones(4, np.int64))
    assert table.rows == 3 and table.stats()["evicted_lru"] == 5


def test_freed_rows_are_reused():
    spec = TableSpec("t", 2, evict_after=1, lr=1.0)
    table = Table(spec)
    for v in range(1, 50):
        table.apply(v, np.array([v], np.int64), torch.ones(1, 2), np.ones(1, np.int64))
    assert table.pool.used <= 2


def test_coalesce_sums_repeated_ids():
    ids, grads, counts = coalesce(np.array([3, 1, 3], np.int64), torch.tensor([[1.0], [2.0], [4.0]]))
    assert ids.tolist() == [1, 3] and grads.flatten().tolist() == [2.0, 5.0] and counts.tolist() == [1, 2]


def test_spec_checks_name_the_value():
    with pytest.raises(InvalidArgument, match="dim"):
        TableSpec("t", 0)
    with pytest.raises(InvalidArgument, match="optimizer"):
        TableSpec("t", 4, optimizer="adam")
    with pytest.raises(InvalidArgument, match=">= 0"):
        TableSpec("t", 4).check_ids(np.array([1, -3], np.int64))
    TableSpec("t", 4, signed_ids=True).check_ids(np.array([-3], np.int64))


def _naive(stream, admit, idle, cap):
    """The documented rules, one id at a time in plain Python: the reference for Table."""
    rows, pending, counts = {}, {}, {"created": 0, "evicted_idle": 0, "evicted_lru": 0, "admission_dropped": 0}
    for version, ids in enumerate(stream, start=1):
        for i in sorted(set(ids)):
            if i in rows:
                rows[i] = version
                continue
            n, _ = pending.get(i, (0, 0))
            if n + 1 >= admit:
                pending.pop(i, None)
                rows[i] = version
                counts["created"] += 1
            else:
                pending[i] = (n + 1, version)
                counts["admission_dropped"] += 1
        if idle:
            for i in [i for i, v in rows.items() if version - v >= idle]:
                del rows[i]
                counts["evicted_idle"] += 1
            for i in [i for i, (_, v) in pending.items() if version - v >= idle]:
                del pending[i]
        if cap and len(rows) > cap:
            for i in sorted(rows, key=lambda i: (rows[i], i))[:len(rows) - cap]:
                del rows[i]
                counts["evicted_lru"] += 1
    return set(rows), set(pending), counts


@pytest.mark.parametrize("admit,idle,cap", [(1, 0, 40), (2, 6, 0), (3, 5, 30), (1, 3, 25)])
def test_admission_and_eviction_follow_the_documented_rules_on_a_random_stream(admit, idle, cap):
    rng = np.random.default_rng(admit * 100 + idle * 10 + cap)
    stream = [rng.zipf(1.3, rng.integers(1, 30)) % 120 for _ in range(300)]
    table = Table(TableSpec("t", 2, admit_after=admit, evict_after=idle, max_rows=cap, lr=0.1))
    for version, ids in enumerate(stream, start=1):
        uniq = np.unique(ids).astype(np.int64)
        table.apply(version, uniq, torch.ones(len(uniq), 2), np.ones(len(uniq), np.int64))
    rows, pending, counts = _naive(stream, admit, idle, cap)
    assert set(table.live_rows()[0].tolist()) == rows
    assert set(table.pending.items()[0].tolist()) == pending
    assert {k: table.stats()[k] for k in counts} == counts
    assert table.recent.size <= 2 * table.rows + 1024 + 30  # stale entries do not pile up


def test_admission_counts_are_capped_least_recently_seen_first(monkeypatch):
    from ps.server import table as table_module

    monkeypatch.setattr(table_module, "PENDING_CAP", 5)
    table = Table(TableSpec("t", 2, admit_after=3))
    for version, i in enumerate([1, 2, 3, 4, 5, 1, 6, 7], start=1):
        table.apply(version, np.array([i], np.int64), torch.ones(1, 2), np.ones(1, np.int64))
    assert sorted(table.pending.items()[0].tolist()) == [1, 4, 5, 6, 7]  # 2 and 3 forgotten
    assert table.stats()["pending_forgotten"] == 2
    table.apply(9, np.array([1], np.int64), torch.ones(1, 2), np.ones(1, np.int64))  # 1's third push
    assert table.rows == 1
