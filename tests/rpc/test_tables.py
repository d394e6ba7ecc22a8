"""Server-held embedding tables on real server processes: sync equals single-process torch with
sparse embeddings, async sums exactly with retries, admission and eviction counted exactly,
bad input refused with nothing changed."""

import numpy as np
import pytest
import torch
from torch import nn

from ps.config import OptimizerConfig
from ps.embedding import ServerEmbeddingBag, TableGroup
from ps.errors import InvalidArgument, PlanMismatch, UnknownTable
from ps.proto import ps_pb2 as pb
from ps.serde import rows_to_proto
from ps.sharding import ParamSpec
from ps.tables import TableSpec, init_rows, init_table
from ps.worker.client import PSClient
from tests.conftest import run_in_threads

VOCAB, DIM, BAG, BATCH, STEPS = 300, 8, 3, 16, 6
TORCH_OPT = {"sgd": lambda p, lr: torch.optim.SGD(p, lr=lr), "adagrad": lambda p, lr: torch.optim.Adagrad(p, lr=lr),
             "lazy_adam": lambda p, lr: torch.optim.SparseAdam(p, lr=lr)}


class Model(nn.Module):
    def __init__(self, optimizer: str):
        super().__init__()
        torch.manual_seed(0)
        self.emb = ServerEmbeddingBag("items", DIM, mode="mean", optimizer=optimizer, lr=0.05)
        self.head = nn.Linear(DIM, 1)

    def forward(self, ids):
        return self.head(self.emb(ids)).squeeze(1)


def _batches():
    gen = torch.Generator().manual_seed(1)
    # Zipf-like: low ids repeat within and across batches (shared rows between the two workers)
    ids = (torch.rand(STEPS, BATCH, BAG, generator=gen) ** 3 * VOCAB).long()
    return ids, torch.randn(STEPS, BATCH, generator=gen)


def _reference(optimizer: str):
    ids, y = _batches()
    spec = TableSpec("items", DIM, optimizer=optimizer, lr=0.05)
    torch.manual_seed(0)
    emb = nn.EmbeddingBag.from_pretrained(init_table(spec, VOCAB), freeze=False, mode="mean", sparse=True)
    head = nn.Linear(DIM, 1)
    dense = torch.optim.SGD(head.parameters(), lr=0.1)
    sparse = TORCH_OPT[optimizer](emb.parameters(), 0.05)
    for step in range(STEPS):
        dense.zero_grad()
        sparse.zero_grad()
        nn.functional.mse_loss(head(emb(ids[step])).squeeze(1), y[step]).backward()
        dense.step()
        sparse.step()
    return emb.weight.detach(), {n: p.detach() for n, p in head.named_parameters()}


@pytest.mark.parametrize("optimizer,transport", [("sgd", "stream"), ("adagrad", "unary"), ("lazy_adam", "shm"), ("sgd", "tcp")])
def test_two_sync_workers_equal_single_process_sparse_training(cluster, transport_for, optimizer, transport):
    transport_for(transport)
    ids, y = _batches()
    models = [Model(optimizer) for _ in range(2)]  # built here: torch's seed is global, not per thread
    with cluster(2, "sync", num_workers=2) as addresses:
        def worker(rank: int) -> None:
            model = models[rank]
            with PSClient(addresses, f"w{rank}", transport=transport) as c:
                group = TableGroup(model, c)
                clock = c.setup(dict(model.named_parameters()), OptimizerConfig("sgd", lr=0.1, momentum=0.0))
                assert group.setup() == "sync"
                for step in range(STEPS):
                    c.pull(clock, into={n: p.data for n, p in model.named_parameters()})
                    group.begin(clock)
                    model.zero_grad()
                    half = slice(rank * BATCH // 2, (rank + 1) * BATCH // 2)
                    nn.functional.mse_loss(model(ids[step, half]), y[step, half]).backward()
                    assert all(r["outcome"] == "ACCUMULATED" or r["outcome"] == "APPLIED" for r in group.push(clock))
                    c.push({n: p.grad for n, p in model.named_parameters()}, clock)
                    clock += 1
                c.leave()

        run_in_threads(worker, 2)
        with PSClient(addresses, heartbeat=False) as obs:
            obs.init_tables([TableSpec("items", DIM, optimizer=optimizer, lr=0.05)])
            rows = obs.pull_rows(None, {"items": torch.arange(VOCAB)})["items"]
            obs.attach([ParamSpec(n, tuple(p.shape)) for n, p in models[0].named_parameters()])
            dense = obs.pull(0, observer=True)
            stats = obs.stats()
    want_rows, want_dense = _reference(optimizer)
    assert torch.allclose(rows, want_rows, atol=1e-6, rtol=0), (rows - want_rows).abs().max()
    for n, p in want_dense.items():
        assert torch.allclose(dense[f"head.{n}"], p, atol=1e-6, rtol=0)
    assert all(s["table_version"] == STEPS and s["table_mode"] == "sync" for s in stats)
    touched = int(ids.unique().numel())
    assert sum(s["tables"]["items"]["rows"] for s in stats) == touched
    assert all(s["rejected"] == 0 for s in stats)


CLIENTS, PUSHES = 6, 40


@pytest.mark.parametrize("transport", ["stream", "unary", "shm", "tcp"])
def test_async_concurrent_pushes_to_overlapping_rows_sum_exactly(cluster, transport_for, transport):
    transport_for(transport)
    spec = TableSpec("t", 4, init="zeros", lr=1.0)
    ids = torch.arange(0, 2000, 7)  # every client pushes every one of these rows
    with cluster(2, "async", num_workers=CLIENTS) as addresses:
        outcomes: list[list[str]] = [[] for _ in range(CLIENTS)]

        def client(i: int) -> None:
            with PSClient(addresses, f"c{i}", transport=transport) as c:
                _join(c, spec)
                grads = torch.full((len(ids), 4), float(i + 1))
                for clock in range(PUSHES):
                    outcomes[i] += [r["outcome"] for r in c.push_rows(clock, {"t": (ids, grads)})]
                    if clock % 8 == 0:  # a retry of the same clock (a lost answer)
                        outcomes[i] += [r["outcome"] for r in c.push_rows(clock, {"t": (ids, grads)})]
                    if clock % 10 == 0:
                        c.pull_rows(clock, {"t": ids[:50]})

        run_in_threads(client, CLIENTS)
        with PSClient(addresses, heartbeat=False) as obs:
            obs.init_tables([spec])
            final = obs.pull_rows(None, {"t": ids})["t"]
            stats = obs.stats()
    expected = -float(PUSHES * sum(range(1, CLIENTS + 1)))
    assert torch.equal(final, torch.full((len(ids), 4), expected))
    for per_client in outcomes:
        assert per_client.count("DUPLICATE") == 2 * 5
        assert per_client.count("APPLIED") == 2 * PUSHES
    assert sum(s["table_version"] for s in stats) == 2 * CLIENTS * PUSHES


def _join(client: PSClient, *specs: TableSpec) -> str:
    """Register with a dense parameter "w" (sgd, lr 1) and declare the tables; their mode."""
    client.setup({"w": torch.zeros(2)}, OptimizerConfig("sgd", lr=1.0, momentum=0.0))
    return client.init_tables(list(specs))


def _scripted(cluster, spec, script, probe):
    """Push gradients of ones for each step's ids (one async worker, one shard); the table's
    stats and the rows of `probe` then."""
    with cluster(1, "async", num_workers=1) as addresses:
        with PSClient(addresses, "w") as c:
            _join(c, spec)
            for clock, step_ids in enumerate(script):
                t_ids = torch.tensor(step_ids)
                c.push_rows(clock, {"t": (t_ids, torch.ones(len(t_ids), 2))})
            return c.stats()[0]["tables"]["t"], c.pull_rows(None, {"t": probe})["t"]


def test_admission_and_eviction_counted_exactly_on_a_scripted_stream(cluster):
    spec = TableSpec("t", 2, init="uniform", lr=1.0, admit_after=2, evict_after=3, max_rows=4)
    script = [[1, 2], [1, 3], [2, 3, 4], [5, 6, 7, 8, 9], [1], [1], [1], [1]]
    s, rows = _scripted(cluster, spec, script, torch.arange(1, 10))
    # v1: 1,2 pending. v2: 1 admitted (created, stepped), 3 pending. v3: 2,3 admitted, 4 pending.
    # v4: 5-9 pending (first sight), none admitted. v5: 1 stepped; 2, 3 untouched since v3: 2 updates.
    # v6: 2 and 3 untouched for 3 updates: evicted idle. v7, v8: 1 stepped.
    assert s["created"] == 3 and s["evicted_idle"] == 2 and s["evicted_lru"] == 0
    assert s["admission_dropped"] == 2 + 1 + 1 + 5  # 1,2 at v1; 3 at v2; 4 at v3; 5..9 at v4
    assert s["rows"] == 1 and s["version"] == len(script)
    init = init_rows(spec, np.arange(1, 10, dtype=np.int64))
    assert torch.equal(rows[1:], init[1:])  # evicted (2, 3) and never admitted (4..9) rows read as init
    assert torch.allclose(rows[0], init[0] - 5.0)  # 1 stepped at v2, v5, v6, v7 and v8 (lr 1, gradient 1)


def test_the_row_cap_evicts_the_least_recently_updated_on_real_servers(cluster):
    spec = TableSpec("t", 2, init="zeros", lr=1.0, max_rows=3)
    script = [[5, 1, 3], [4], [1, 7], [2]]
    s, rows = _scripted(cluster, spec, script, torch.tensor([1, 2, 3, 4, 5, 7]))
    rows = rows[:, 0].tolist()
    # v2: 1, 3, 5 (v1) and 4: 1 goes (lowest id of the oldest). v3: 1 back, 7: 3 and 5 go (v1).
    # v4: 2 joins 4 (v2), 1 and 7 (v3): 4 goes.
    assert s["evicted_lru"] == 4 and s["rows"] == 3 and s["created"] == 7
    assert rows == [-1.0, -1.0, 0.0, 0.0, 0.0, -1.0]  # 1 (created again at v3), 2, 7 held; the rest read as init


def test_bad_table_input_is_refused_and_changes_nothing(cluster):
    spec = TableSpec("t", 4, init="zeros", lr=1.0)
    with cluster(1, "async", num_workers=1) as addresses:
        with PSClient(addresses, "w") as c:
            _join(c, spec)
            c.push_rows(0, {"t": (torch.tensor([1, 2]), torch.ones(2, 4))})
            before = c.stats()[0]
            with pytest.raises(InvalidArgument, match="int64"):
                c.push_rows(1, {"t": (torch.tensor([1, 2], dtype=torch.int32), torch.ones(2, 4))})
            with pytest.raises(InvalidArgument, match=">= 0"):
                c.pull_rows(1, {"t": torch.tensor([3, -1])})
            with pytest.raises(InvalidArgument, match="shape"):
                c.push_rows(1, {"t": (torch.tensor([1, 2]), torch.ones(3, 4))})
            with pytest.raises(PlanMismatch, match="differ"):
                c.init_tables([TableSpec("t", 8)])
            # The same mistakes sent past the client's checks reach the server, which refuses them.
            raw = [
                ("int64", pb.Rows(table="t", ids=np.array([1, 2], np.int32).tobytes(), ids_dtype="int32",
                                  values=np.ones((2, 4), np.float32).tobytes())),
                ("multiple of 8", pb.Rows(table="t", ids=b"\x01\x02\x03", values=b"")),
                (">= 0", rows_to_proto("t", np.array([5, -2], np.int64), torch.ones(2, 4))),
                ("one row per id", rows_to_proto("t", np.array([1, 2], np.int64), torch.ones(3, 4))),
                ("NaN", rows_to_proto("t", np.array([1, 2], np.int64), torch.full((2, 4), float("nan")))),
                ("no table", rows_to_proto("u", np.array([1], np.int64), torch.ones(1, 4))),
                ("float32", pb.Rows(table="t", ids=np.array([1], np.int64).tobytes(), dtype="float16",
                                    values=b"\0" * 8)),
            ]
            for rule, rows in raw:
                req = pb.PushRowsRequest(worker_id="w", clock=1, tables=[rows])
                with pytest.raises(UnknownTable if rule == "no table" else InvalidArgument, match=rule):
                    c._t.run(c._t.call(0, "PushRows", req))
            after = c.stats()[0]
            final = c.pull_rows(None, {"t": torch.tensor([1, 2, 5])})["t"]
    assert after["rejected"] - before["rejected"] == len(raw)
    def strip(t):
        return {k: v for k, v in t.items() if k != "rows_pulled"}

    assert strip(after["tables"]["t"]) == strip(before["tables"]["t"])
    assert after["table_version"] == before["table_version"] == 1
    assert torch.equal(final, torch.tensor([[-1.0] * 4, [-1.0] * 4, [0.0] * 4]))


def test_tables_survive_a_server_restart_from_their_checkpoint(tmp_path):
    from ps.cli.launch import start_servers, stop_all
    from tests.conftest import _Sink

    spec = TableSpec("t", 4, optimizer="adagrad", lr=0.5, admit_after=2)
    ids = torch.arange(0, 5000, 3)
    flags = ["--checkpoint-dir", str(tmp_path), "--checkpoint-every", "1000", "--checkpoint-chunk-bytes", str(1 << 20)]
    procs = start_servers(2, "async", 1, extra=flags, out=_Sink())
    try:
        with PSClient([p.address for p in procs], "w") as c:
            _join(c, spec)
            for clock in range(3):
                c.push_rows(clock, {"t": (ids, torch.full((len(ids), 4), float(clock + 1)))})
            before = c.pull_rows(None, {"t": ids})["t"]
            stats_before = [s["tables"]["t"] for s in c.stats()]
    finally:
        stop_all(procs)  # SIGTERM: each server writes a checkpoint as it stops
    procs = start_servers(2, "async", 1, extra=[*flags, "--restore"], out=_Sink())
    try:
        with PSClient([p.address for p in procs], "w") as c:
            c.init_tables([spec])
            after = c.pull_rows(None, {"t": ids})["t"]
            stats_after = [s["tables"]["t"] for s in c.stats()]
    finally:
        stop_all(procs)
    assert torch.equal(after, before)
    strip = [{k: v for k, v in s.items() if k != "rows_pulled"} for s in stats_after]
    assert strip == [{k: v for k, v in s.items() if k != "rows_pulled"} for s in stats_before]
    assert sum(s["rows"] for s in stats_after) == len(ids)


def test_ssp_tables_hold_a_fast_worker_to_the_bound_while_dense_runs_async(cluster):
    # hybrid the other way round: dense async, tables ssp(1)
    spec = TableSpec("t", 2, init="zeros", lr=1.0)
    with cluster(1, "async", num_workers=2, extra=["--table-mode", "ssp", "--table-staleness", "1"]) as addresses:
        with PSClient(addresses, "fast") as fast, PSClient(addresses, "slow") as slow:
            for c in (fast, slow):
                assert _join(c, spec) == "ssp"
            one = {"t": (torch.tensor([3]), torch.ones(1, 2))}
            fast.push_rows(0, one)
            fast.push_rows(1, one)
            assert fast.pull_rows(1, {"t": torch.tensor([3])})["t"].tolist() == [[-2.0, -2.0]]  # 1 - 1 <= slow's 0
            ahead = fast.pull_rows_async(2, {"t": torch.tensor([3])})  # needs slow at clock >= 1
            import time
            time.sleep(0.5)
            assert not ahead.done()
            slow.push_rows(0, one)
            assert ahead.result(timeout=10)["t"].tolist() == [[-3.0, -3.0]]
            assert fast.stats()[0]["table_mode"] == "ssp" and fast.stats()[0]["mode"] == "async"


def test_a_sync_table_step_goes_on_without_a_worker_that_died():
    from tests.conftest import running_cluster

    spec = TableSpec("t", 2, init="zeros", lr=1.0)
    with running_cluster(2, "sync", num_workers=2, worker_timeout=2.0) as addresses:
        a, b = PSClient(addresses, "a"), PSClient(addresses, "b")
        try:
            for c in (a, b):
                _join(c, spec)
            ids = torch.arange(10)
            a.push_rows(0, {"t": (ids, torch.ones(10, 2))})
            b.push_rows(0, {"t": (ids, 3 * torch.ones(10, 2))})
            assert a.pull_rows(1, {"t": ids})["t"].tolist() == [[-2.0, -2.0]] * 10  # the average of 1 and 3
            a.push_rows(1, {"t": (ids, torch.ones(10, 2))})
            b.close()  # b dies: no leave, no heartbeat; evicted after the lease
            rows = a.pull_rows(2, {"t": ids})["t"]  # waits for b's eviction, then step 1 is a's alone
            assert rows.tolist() == [[-3.0, -3.0]] * 10
            assert sum(s["evictions"] for s in a.stats()) == 2
        finally:
            a.close()
            b.close()


def test_prefetched_rows_are_the_rows_a_forward_reads_at_that_clock(cluster):
    from ps.embedding import ServerEmbedding

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = ServerEmbedding("a", 4, lr=1.0)

        def forward(self, ids):
            return self.a(ids).sum()

    with cluster(2, "sync", num_workers=1) as addresses, PSClient(addresses, "w") as c:
        model = Two()
        c.setup({"b": torch.zeros(2)}, OptimizerConfig("sgd", lr=1.0, momentum=0.0))
        group = TableGroup(model, c)
        group.setup()
        ids = torch.tensor([5, 9, 5, 200])
        group.begin(0)
        model(ids).backward()
        group.push(0)
        group.prefetch({"a": torch.tensor([9, 5, 200, 7])}, 1)  # waits on the servers for step 0
        pulls = []
        real = c.pull_rows
        c.pull_rows = lambda clock, request: pulls.append(clock) or real(clock, request)
        group.begin(1)
        model.eval()
        model(ids)  # an observer read in between (an evaluation) leaves the prefetch alone
        model.train()
        rows = model.a._lookup(ids)[0]  # all among the prefetched: no pull
        assert pulls == [None]
        fresh = real(1, {"a": torch.tensor([5, 9, 200])})["a"]
        assert torch.equal(rows, fresh)
        assert torch.equal(fresh[0], init_rows(TableSpec("a", 4, lr=1.0), np.array([5], np.int64))[0] - 2.0)
        model.a._lookup(torch.tensor([5, 11]))  # 11 was not prefetched: read now
        assert pulls == [None, 1]


def test_a_sync_table_step_waits_for_a_worker_whose_dense_push_came_first(cluster):
    # (as with --push-early: a shard holding no dense tensor gets the empty dense push at once)
    spec = TableSpec("t", 2, init="zeros", lr=1.0)
    with cluster(1, "sync", num_workers=2) as addresses:
        a, b = PSClient(addresses, "a"), PSClient(addresses, "b")
        try:
            for c in (a, b):
                _join(c, spec)
            ids = torch.arange(4)
            a.push({"w": torch.ones(2)}, 0)
            b.push({"w": torch.ones(2)}, 0)
            assert a.push_rows(0, {"t": (ids, torch.ones(4, 2))})[0]["outcome"] == "ACCUMULATED"
            assert b.push_rows(0, {"t": (ids, 3 * torch.ones(4, 2))})[0]["outcome"] == "ACCUMULATED"
            assert a.pull_rows(1, {"t": ids})["t"].tolist() == [[-2.0, -2.0]] * 4  # the average of 1 and 3
        finally:
            a.close()
            b.close()


def _restart_flags(tmp_path, every):
    """Flags of a server that comes back at the same address, from its checkpoints."""
    from ps.tp.groups import free_port

    return ["--port", str(free_port()), "--checkpoint-dir", str(tmp_path), "--checkpoint-every", every]


def test_sync_tables_go_on_after_a_crash_restored_from_an_older_checkpoint(tmp_path):
    import signal

    from ps.cli.launch import start_servers, stop_all
    from tests.conftest import _Sink

    flags = _restart_flags(tmp_path, "3")
    procs = start_servers(1, "sync", 1, extra=flags, out=_Sink(), worker_timeout=3.0)
    ids = torch.arange(6)
    c = PSClient([procs[0].address], "w")
    try:
        clock = c.setup({"w": torch.zeros(2)}, OptimizerConfig("sgd", lr=1.0, momentum=0.0))
        c.init_tables([TableSpec("t", 2, init="zeros", lr=1.0)])

        def step(clock):
            c.pull(clock, into={"w": torch.zeros(2)})
            c.pull_rows(clock, {"t": ids})
            c.push_rows(clock, {"t": (ids, torch.ones(6, 2))})
            c.push({"w": torch.ones(2)}, clock)

        for clock in range(5):
            step(clock)
        procs[0].popen.send_signal(signal.SIGKILL)  # its newest checkpoint is older than step 4
        procs[0].popen.wait()
        procs = start_servers(1, "sync", 1, extra=[*flags, "--restore"], out=_Sink(), worker_timeout=3.0)
        for clock in range(5, 8):
            step(clock)
        s = c.stats()[0]
        assert s["version"] == s["table_version"] == 8
    finally:
        c.close()
        stop_all(procs)


def test_a_sync_table_step_restored_half_done_goes_on_without_a_worker_that_never_came_back(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from ps.cli.launch import start_servers, stop_all
    from tests.conftest import _Sink

    flags = _restart_flags(tmp_path, "1000")
    procs = start_servers(1, "sync", 3, extra=flags, out=_Sink(), worker_timeout=2.0)
    ids = torch.arange(4)
    clients = {n: PSClient([procs[0].address], n) for n in "abc"}
    try:
        for c in clients.values():
            _join(c, TableSpec("t", 2, init="zeros", lr=1.0))
        clients["a"].push_rows(0, {"t": (ids, torch.ones(4, 2))})
        clients["b"].push_rows(0, {"t": (ids, torch.ones(4, 2))})
        stop_all(procs)  # SIGTERM: a checkpoint holding the half-done step (a and b in, c not)
        clients["c"].close()  # c never comes back
        procs = start_servers(1, "sync", 3, extra=[*flags, "--restore"], out=_Sink(), worker_timeout=2.0)
        with ThreadPoolExecutor(2) as ex:
            got = [ex.submit(clients[n].pull_rows, 1, {"t": ids}) for n in "ab"]
            assert all(f.result(timeout=30)["t"].tolist() == [[-1.0, -1.0]] * 4 for f in got)
    finally:
        for c in clients.values():
            c.close()
        stop_all(procs)


def test_a_bad_row_for_one_shard_changes_no_shard(cluster):
    with cluster(2, "async", num_workers=1) as addresses:
        with PSClient(addresses, "w") as c:
            _join(c, TableSpec("t", 4, init="zeros", lr=1.0))
            grads = torch.ones(100, 4)
            grads[37, 2] = float("nan")
            with pytest.raises(InvalidArgument, match="NaN"):
                c.push_rows(0, {"t": (torch.arange(100), grads)})
            with pytest.raises(InvalidArgument, match="one message"):
                c.push_rows(0, {"t": (torch.arange(6_000_000), torch.zeros(6_000_000, 4))})
            assert [s["table_version"] for s in c.stats()] == [0, 0]
            assert c.pull_rows(None, {"t": torch.arange(100)})["t"].abs().sum() == 0


def _train_rows(cluster, device: str) -> torch.Tensor:
    """3 sync steps of the Model above on `device` (one worker); the table's rows after."""
    ids, y = _batches()
    model = Model("adagrad").to(device)
    with cluster(1, "sync", num_workers=1) as addresses, PSClient(addresses, "w") as c:
        group = TableGroup(model, c)
        clock = c.setup({n: p.detach().cpu() for n, p in model.named_parameters()},
                        OptimizerConfig("sgd", lr=0.1, momentum=0.0))
        group.setup()
        for step in range(3):
            weights = c.pull(clock)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(weights[n])
            group.begin(clock)
            model.zero_grad()
            nn.functional.mse_loss(model(ids[step].to(device)), y[step].to(device)).backward()
            group.push(clock)
            c.push({n: p.grad.cpu() for n, p in model.named_parameters()}, clock)
            clock += 1
        return c.pull_rows(None, {"items": torch.arange(VOCAB)})["items"]


@pytest.mark.gpu
def test_a_cuda_model_trains_server_held_rows_like_a_cpu_one(cluster):
    torch.testing.assert_close(_train_rows(cluster, "cuda"), _train_rows(cluster, "cpu"), rtol=1e-4, atol=1e-5)


def test_a_sync_pull_that_runs_ahead_of_its_own_push_waits_and_gives_nothing_up(cluster):
    spec = TableSpec("t", 2, init="zeros", lr=1.0)
    with cluster(1, "sync", num_workers=1) as addresses, PSClient(addresses, "w") as c:
        _join(c, spec)
        ids = torch.tensor([3, 4])
        for clock in range(3):
            ahead = c.pull_rows_async(clock + 1, {"t": ids})  # the next step's rows, asked for first
            assert c.push_rows(clock, {"t": (ids, torch.ones(2, 2))})[0]["outcome"] == "ACCUMULATED"
            assert ahead.result(timeout=10)["t"].tolist() == [[-(clock + 1.0)] * 2] * 2
        s = c.stats()[0]
        assert s["table_version"] == 3 and s["tables"]["t"]["rows"] == 2
