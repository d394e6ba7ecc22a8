"""PSClient: pull weights from and push gradients to all server shards, concurrently.

    client = PSClient(["127.0.0.1:5000", "127.0.0.1:5001"], worker_id="w0")
    clock = client.setup(dict(model.named_parameters()), OptimizerConfig("sgd", lr=0.1))
    for step in range(100):
        weights = client.pull(clock)          # {name: fp32 CPU tensor}, owned by the caller
        ...                                   # load weights, forward, backward
        client.push({n: p.grad for n, p in model.named_parameters()}, clock)
        clock += 1
    client.close()

`compress="bf16"` (or "fp16") halves the bytes of every push: gradients travel in that dtype and
the servers apply them in fp32. `compress="topk:0.01"` sends the largest 1% of each slice's
entries (8 bytes each) and keeps the rest for later pushes (error feedback; see ps.compress).

If a shard evicts the worker (silent past the timeout, or stalled past the progress timeout),
the next call registers again by itself. A push the servers did not apply because of that is
answered EVICTED (not DUPLICATE, which means a retry of a push already taken): pull fresh
weights and continue from `max(clock, client.clock_floor)` (the trainer does).

All calls run as coroutines on one event loop, on a thread of the client's own (see
ps.worker.transport); the methods here hand them over and wait. Tensors passed to `push` are
read before it returns; the caller must not modify them until then. One client serves one worker; its methods may be called from one
thread at a time, except that a `prefetch` runs in the background and a `push_stream` may be
fed from another thread (e.g. autograd's) while the caller pushes or pulls.

Several processes can act as one worker (the ranks of a tensor-parallel group, each holding
keys of its own): each makes a client with the same `worker_id` and `member=(rank, size)`. Their
pushes for a clock are then parts of one push, applied once every member's parts are in, so the
servers count one clock, one version and one staleness per group; each member's push returns
the group push's outcome. Any member may register, pull and send heartbeats; only one should
`leave`, once all are done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import uuid
from typing import Mapping, Sequence

import numpy as np
import torch

from ps import wire
from ps.compress import Compressor
from ps.config import DEFAULT_PARTITION_BYTES, MAX_MESSAGE_BYTES, MESSAGE_HEADROOM_BYTES, OptimizerConfig
from ps.errors import InvalidArgument, NotInitialized, Overloaded, PSError, UnknownTable, UnknownWorker
from ps.proto import ps_pb2 as pb
from ps.serde import (optimizer_to_proto, plan_to_proto, rows_to_proto, stats_from_proto, table_spec_to_proto,
                      tensor_to_proto, values_from_proto)
from ps.server.auth import bearer
from ps.sharding import ParamSpec, Plan, dtype_name, make_plan
from ps.tables import TableSpec, as_ids, shard_of
from ps.worker.codec import Codec, Job, Lapsed, Mirrors, Pulled, answer_bytes, push_results
from ps.worker.membership import Membership
from ps.worker.transport import RETRIED, Transport, gather_all

log = logging.getLogger("ps.worker")
REDO = (*RETRIED, UnknownWorker, NotInitialized)  # a part failing so is sent again (see `_settle`)
ROWS_REQUEST_BYTES = 8 << 20  # bytes of rows a table pull asks one shard for in one request
BY_REFERENCE = 4 << 20  # bytes of a pull through shared memory from which push_pull pushes, then pulls
REREADS = 2  # times a pull reads the weights again after a shard answered it only after an outage
REINIT_WAIT = 30.0  # seconds a worker lacking some of a restarted-empty shard's keys waits for another to rebuild it
TAKEN = (pb.PushResponse.APPLIED, pb.PushResponse.ACCUMULATED, pb.PushResponse.DUPLICATE)


class PushStream:
    """One push whose gradients arrive tensor by tensor (`PSClient.push_stream`). Requests go out
    as soon as all their gradients are in (a shard that holds none of these tensors gets its
    empty push, which moves this worker's clock there, at once); `finish` sends the tensors never
    added as having no gradient (the servers do not step them), waits and returns one result per
    shard, as `push` does. A tensor handed to `add` is read until `finish` returns: do not
    modify it before. `add` may be called from any one thread at a time (e.g. autograd's)."""

    def __init__(self, client: "PSClient", clock: int, dtypes: Mapping[str, torch.dtype]):
        self.client, self.clock, self.dtypes = client, clock, dict(dtypes)
        self._jobs = client._codec.layout(self.dtypes)
        self._flat: dict[str, torch.Tensor] = {}
        self._missing = [{s.name for s in job[2]} for job in self._jobs]
        self._jobs_of: dict[str, list[int]] = {}
        for i, names in enumerate(self._missing):
            for n in names:
                self._jobs_of.setdefault(n, []).append(i)
        self._added: set[str] = set()
        self._sent: list[tuple[Job, wire.Frame, concurrent.futures.Future]] = []
        self._lock = threading.Lock()
        for i, names in enumerate(self._missing):
            if not names:
                self._send(i)

    def _send(self, i: int) -> None:
        job = self._jobs[i]
        request = self.client._push_request(self.clock, job, self._flat)
        self._sent.append((job, request, self.client._t.submit(self.client._try(job[0], "Push", request))))

    def add(self, name: str, grad: torch.Tensor | None) -> None:
        """The gradient of `name` is final (None: it has none): send every request it completes."""
        if name not in self.dtypes:
            raise InvalidArgument(f"gradient {name!r} is not part of this push (expected one of {sorted(self.dtypes)[:5]})")
        spec = self.client.plan.specs[name]
        if grad is not None and tuple(grad.shape) != tuple(spec.shape):
            raise InvalidArgument(f"gradient {name!r} has shape {tuple(grad.shape)}, expected {tuple(spec.shape)}")
        with self._lock:
            if name in self._added:
                raise InvalidArgument(f"gradient {name!r} was already added to the push for step {self.clock}")
            if grad is not None:
                self._flat.update(self.client._codec.split({name: grad.to(self.dtypes[name])}))
            self._added.add(name)
            for i in self._jobs_of.get(name, ()):
                self._missing[i].discard(name)
                if not self._missing[i]:
                    self._send(i)

    def finish(self) -> list[dict]:
        for name in [n for n in self.dtypes if n not in self._added]:
            self.add(name, None)
        async def settle() -> list[tuple[int, pb.PushResponse]]:
            sent = [(job, req, asyncio.wrap_future(f)) for job, req, f in self._sent]
            return await self.client._settle(sent, self.clock)

        return self.client._outcomes(self._jobs, lambda: self.client._t.run(settle()))


class Prefetch:
    """Weights being pulled in the background (`PSClient.prefetch`): the task's result is the
    Pulled and the client's count of waited-out outages when it ended."""

    def __init__(self, client: "PSClient", task: asyncio.Task, clock: int, names: Sequence[str] | None):
        self._client, self._task, self._clock, self._names = client, task, clock, names

    def install(self, into: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Wait, write the weights into `into` {name: tensor}, and count the versions read as this
        worker's (the base of its next push). Weights read before a call of this worker waited
        out an outage (the push this prefetch overlapped, say) may be far older than the others'
        pushes since: those are read again instead (see PSClient._pull)."""
        pulled, seen = self._client._t.result(self._task)
        if self._client._t.recoveries != seen:
            pulled.drain()
            log.info("%s: the prefetched weights for clock %d were read before an outage was waited out; "
                     "reading them again", self._client.worker_id, self._clock)
            return self._client.pull(self._clock, names=self._names, into=into)
        pulled.given = dict(into)
        return self._client._installed(pulled)

    def cancel(self) -> None:
        """Drop it: the pull is cancelled where it is (a pull waiting for this worker's own push,
        which will not come, ends at once) and has ended when this returns."""
        self._client._t.cancel(self._task)


class PSClient:
    def __init__(self, servers: Sequence[str], worker_id: str | None = None, *,
                 partition_bytes: int = DEFAULT_PARTITION_BYTES, connect_timeout: float = 60.0,
                 retry_timeout: float = 60.0, rpc_timeout: float = 120.0, heartbeat: bool = True,
                 compress: str = "none", auth_token: str = "", tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = "", member: tuple[int, int] = (0, 1), transport: str = "unary"):
        if not servers:
            raise PSError("servers must name at least one host:port")
        if not 0 <= member[0] < member[1]:
            raise InvalidArgument(f"member ({member[0]}) must be in [0, members={member[1]})")
        self.member = member
        self._compressor = Compressor(compress)  # validates the spec
        self.servers = list(servers)
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.partition_bytes = partition_bytes
        self.rpc_timeout = rpc_timeout
        self._t = Transport(self.servers, metadata=bearer(auth_token) if auth_token else None,
                            retry_timeout=retry_timeout, rpc_timeout=rpc_timeout, tls_ca=tls_ca, tls_cert=tls_cert,
                            tls_key=tls_key, transport=transport)
        self._t.worker_id = self.worker_id
        self._m = Membership(self._t, self.worker_id, heartbeat)
        self._codec: Codec | None = None
        self._optimizer: OptimizerConfig | None = None
        self._mirrors = Mirrors()  # pinned host copies for pulls into CUDA tensors
        self.tables: dict[str, TableSpec] = {}  # server-held tables declared (init_tables)
        self.table_versions = [0] * len(self.servers)  # the newest table version read from each shard
        self.table_mode = ""
        self.table_bytes_pulled = 0  # bytes of table rows this client has read
        self._tables_request: pb.InitTablesRequest | None = None
        self._push_buffers: dict[str, tuple[np.ndarray, torch.Tensor]] = {}  # see _row_buffers
        try:
            self._t.run(self._t.wait_connected(connect_timeout))
        except BaseException:
            self._t.close()
            raise

    # -- state the trainer reads -----------------------------------------------------------
    @property
    def plan(self) -> Plan | None:
        return self._m.plan

    @property
    def clock_floor(self) -> int:
        """The lowest clock the servers will take pushes from (moves up when they re-place this worker)."""
        return self._m.clock_floor

    @property
    def versions(self) -> list[int]:
        return self._m.versions

    @property
    def last_min_clocks(self) -> dict[int, int]:
        return self._m.min_clocks

    def paths(self) -> list[str]:
        """Per shard, the path its tensors take now: "unary", "stream" or "shm" (see --transport)."""
        return [self._t.path(k) for k in range(len(self.servers))]

    @property
    def info(self) -> list[pb.RegisterResponse]:
        return self._m.info

    @property
    def mode(self) -> str:
        """The servers' consistency mode (known once registered)."""
        return self._m.info[0].mode if self._m.info else ""

    # -- membership ---------------------------------------------------------------------------
    def attach(self, specs: Sequence[ParamSpec]) -> Plan:
        """Compute the plan for these parameters without joining (enough for observer pulls)."""
        plan = make_plan(list(specs), len(self.servers), self.partition_bytes)
        self._m.plan = plan
        self._codec = Codec(plan, len(self.servers), self.partition_bytes, self._compressor, self.member)
        self._t.shm_regions = [self._codec.shard_bytes(k) for k in range(len(self.servers))]
        return plan

    def register(self, specs: Sequence[ParamSpec]) -> int:
        """Compute the plan for these parameters, join every shard, start heartbeats; returns the
        clock to start at (the largest any shard asks for)."""
        self.attach(specs)

        async def go() -> int:
            self._m.left = False
            infos = await self._m.join()
            self._m.versions[:] = [r.version for r in infos]
            self._m.start_heartbeat()
            return max(r.clock for r in infos)

        return self._t.run(go())

    def init(self, tensors: Mapping[str, torch.Tensor], optimizer: OptimizerConfig) -> bool:
        """Send initial values and the optimizer; idempotent. True if this call set the values
        (False: the servers already held values, which win; pull to get them)."""
        assert self.plan is not None, "register first"
        self._optimizer = optimizer

        async def go() -> bool:
            applied = await self._send_init(tensors, range(len(self.servers)), self._m.rejoiner(0))
            if self.member[1] > 1:  # the members share one init at the shards: return once it is built
                built = await gather_all([self._until_initialized(k, self._t.retry_timeout)
                                          for k in range(len(self.servers))])
                if not all(built):
                    raise NotInitialized(f"servers {[a for a, ok in zip(self.servers, built) if not ok]} were not "
                                         f"initialised within {self._t.retry_timeout:.0f}s of this member's init")
            return applied

        return self._t.run(go())

    async def _until_initialized(self, shard: int, timeout: float) -> bool:
        """Wait (polling Stats) until the shard holds parameters; False if it does not within `timeout`."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (await self._t.call(shard, "Stats", pb.StatsRequest())).initialized:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _send_init(self, tensors: Mapping[str, torch.Tensor], shards, rejoin, versions=None) -> bool:
        """Init requests for these shards' slices (`versions`: per shard, the version the values hold)."""
        plan = self.plan
        names = {s.name for k in shards for s in plan.slices_for(k)}
        flat = plan.split({n: tensors[n].detach().to("cpu", torch.float32) for n in names}, sorted(names))
        spec, opt = plan_to_proto(plan), optimizer_to_proto(self._optimizer)

        async def send(shard: int, part: int, batch, num_parts: int) -> bool:
            req = pb.InitRequest(
                worker_id=self.worker_id, plan_fingerprint=plan.fingerprint, plan=spec, optimizer=opt,
                tensors=[tensor_to_proto(s.key, flat[s.key]) for s in batch], part=part, num_parts=num_parts,
                version=versions[shard] if versions else 0,
            )
            return (await self._t.call(shard, "Init", req, rejoin=rejoin)).applied

        jobs = [(k, i, b, len(self._codec.pull_batches[k])) for k in shards
                for i, b in enumerate(self._codec.pull_batches[k])]
        return any(await gather_all([send(*job) for job in jobs]))

    def hold(self, weights: Mapping[str, torch.Tensor]) -> None:
        """The tensors that hold this worker's current weights (e.g. its model's parameters, kept
        up to date by its pulls). Should a shard restart empty (it had no checkpoint), the
        client initialises it again from them at the version they hold, instead of failing; the
        shard counts the updates it lost. A worker holding only some of a shard's parameters (a
        tensor-parallel rank) cannot: it waits up to 30 s for another (its group's rank that holds
        them) to, then gets a clear error. Call it once the tensors hold pulled weights."""
        if self._optimizer is None:
            raise InvalidArgument("hold() needs the optimizer the servers were initialised with: call init (or setup) "
                                  "first")
        self._m.reinit = functools.partial(self._reinit, dict(weights))

    async def _reinit(self, weights: Mapping[str, torch.Tensor], shard: int) -> None:
        missing = sorted({s.name for s in self.plan.slices_for(shard)} - set(weights))
        # Another process that holds them (a TP group's other rank) may be initialising it now.
        if missing and not await self._until_initialized(shard, min(REINIT_WAIT, self._t.retry_timeout)):
            raise NotInitialized(
                f"server {self.servers[shard]} (shard {shard}) restarted empty, and this worker does not hold all its "
                f"parameters to initialise it again (it lacks {missing[:3]}): restart that server with --restore from "
                "a checkpoint (--checkpoint-dir)")
        if missing:
            return
        log.warning("server %s (shard %d) restarted empty: initialising it again from this worker's weights "
                    "(version %d)", self.servers[shard], shard, self._m.versions[shard])
        await self._send_init(weights, [shard], None, self._m.versions)

    def setup(self, tensors: Mapping[str, torch.Tensor], optimizer: OptimizerConfig) -> int:
        """register + init in one call; returns the clock to start at."""
        specs = [ParamSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in tensors.items()]
        clock = self.register(specs)
        self.init(tensors, optimizer)
        return clock

    # -- data ---------------------------------------------------------------------------------
    def pull(self, clock: int, observer: bool = False, names: Sequence[str] | None = None,
             into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Parameters (all, or `names`) as fp32 CPU tensors, once the servers' mode lets a worker
        at `clock` read. `observer=True` reads without waiting or joining (evaluation, monitoring).
        `into` {name: tensor}: write the values there too; contiguous fp32 CPU tensors (e.g. a CPU
        model's parameters, or pinned buffers) are decoded into directly, with no extra copy, and
        contiguous fp32 CUDA tensors get each slice as it arrives, through a pinned host mirror
        the client keeps, copied without blocking (done when this returns). The result holds
        those tensors themselves. A pull that fails may leave them partly written (on the data
        port, a slice being received when the connection broke holds some of its new bytes)."""
        pulled = self._t.run(self._pull(clock, observer, names, into, streams=self._mirrors.prepare(into)))
        return pulled.finish() if observer else self._installed(pulled)

    def pull_async(self, clock: int, observer: bool = False, names: Sequence[str] | None = None
                   ) -> concurrent.futures.Future:
        """`pull` in the background; the future resolves to its result."""
        async def go() -> dict[str, torch.Tensor]:
            pulled = await self._pull(clock, observer, names, None)
            return pulled.finish() if observer else self._installed(pulled)

        return self._t.submit(go())

    def prefetch(self, clock: int, names: Sequence[str] | None = None) -> Prefetch:
        """Start pulling the weights for `clock` in the background (async and ssp modes: while
        this worker computes the step before). The versions read count only once installed."""
        # Should it have to register again, this worker is still at clock - 1 (its push for that
        # step may not have gone out yet): registering at `clock` would make that push a duplicate.
        async def fetch() -> tuple[Pulled, int]:
            pulled = await self._pull(clock, False, names, None, own_clock=clock - 1)
            return pulled, self._t.recoveries

        return Prefetch(self, self._t.start(fetch()), clock, names)

    def _installed(self, pulled: Pulled) -> dict[str, torch.Tensor]:
        """A worker's pull is complete: its weights are in place and its versions are this worker's."""
        out = pulled.finish()
        self._m.min_clocks = pulled.min_clocks
        for shard, v in pulled.versions.items():
            self._m.versions[shard] = v
        return out

    async def _pull(self, clock: int, observer: bool, names: Sequence[str] | None,
                    into: Mapping[str, torch.Tensor] | None, own_clock: int | None = None,
                    streams: dict | None = None) -> Pulled:
        """The weights for `clock`. Should some shard answer only after waiting out an outage (a
        retry after an error, or registering again), the others' answers may be far older than
        its by then (in async mode other workers go on pushing there meanwhile): they are read
        again, so the weights a worker trains on come from about one moment (at most REREADS
        times; a pull that keeps meeting outages takes what the last reading got)."""
        assert self._codec is not None, "register (or attach) first"
        worker = "" if observer else self.worker_id
        rejoin = None if observer else self._m.rejoiner(clock if own_clock is None else own_clock)

        async def fetch(pulled: Pulled, shard: int, batch) -> None:
            req = pb.PullRequest(worker_id=worker, plan_fingerprint=self.plan.fingerprint, clock=clock,
                                 keys=[s.key for s in batch])
            for attempt in range(REREADS + 1):
                resp = await self._t.call(shard, "Pull", req, rejoin=rejoin, waits=not observer,
                                          answer_bytes=answer_bytes(batch), place=pulled.place(req.keys))
                try:
                    return pulled.absorb(shard, resp)
                except Lapsed:
                    if attempt == REREADS:
                        raise

        for reading in range(REREADS + 1):
            pulled = Pulled(self.plan, self.servers, names, into, self._mirrors, streams)
            seen = self._t.recoveries
            await gather_all([fetch(pulled, k, b) for k, bs in enumerate(self._codec.batches_for(names, self._wide()))
                              for b in bs])
            if self._t.recoveries == seen or reading == REREADS:
                break
            pulled.drain()
            log.info("%s: a shard answered the pull for clock %d only after an outage; reading the weights again",
                     self.worker_id or "observer", clock)
        return pulled

    def _push_request(self, clock: int, job: Job, flat: Mapping[str, torch.Tensor]) -> wire.Frame:
        return self._codec.push_request(self.worker_id, clock, self._m.versions[job[0]], job, flat)

    async def _try(self, shard: int, method: str, request):
        """One attempt; a failure is returned, not raised (`_settle` decides)."""
        try:
            return await self._t.attempt(shard, method, request)
        except PSError as e:
            return e

    async def _settle(self, sent: Sequence[tuple[Job, wire.Frame, "asyncio.Future"]], clock: int
                      ) -> list[tuple[int, object]]:
        """Wait for pushed parts; (shard, response) pairs in their order. A part that failed
        because its server was unreachable or no longer knew this worker is sent again through
        `call` (which retries and registers again), and so is every other part to that shard,
        in order: a restarted server has lost the parts it had acknowledged (parts it still
        holds are answered DUPLICATE). A part refused as overloaded is sent again alone. A part
        refused as invalid is not sent again."""
        results = [await f for _, _, f in sent]
        every: set[int] = set()  # shards to send every part again
        overloaded: set[int] = set()  # shards to send only their refused parts again
        for (job, _, _), r in zip(sent, results):
            if isinstance(r, Overloaded):
                overloaded.add(job[0])
            elif isinstance(r, REDO):
                every.add(job[0])
            elif isinstance(r, PSError):
                r.taken_shards = {job[0] for (job, _, _), x in zip(sent, results)
                                  if not isinstance(x, PSError) and x.outcome in TAKEN}
                raise r
        rejoin = self._m.rejoiner(clock)

        async def again(shard: int, all_parts: bool) -> None:
            for i, (job, req, _) in enumerate(sent):  # in order: the last part completes the push
                if job[0] == shard and (all_parts or isinstance(results[i], Overloaded)):
                    results[i] = await self._t.call(shard, "Push", req, rejoin=rejoin)

        shards = {job[0] for job, _, _ in sent}
        await gather_all([again(k, k in every) for k in every | overloaded])
        # A shard whose parts all answer BUFFERED lost some it had taken (it restarted while a
        # refused part was resent alone): send it every part again.
        done = {job[0] for (job, _, _), r in zip(sent, results) if r.outcome != pb.PushResponse.BUFFERED}
        await gather_all([again(k, True) for k in shards - done])
        return [(job[0], r) for (job, _, _), r in zip(sent, results)]

    def push(self, grads: Mapping[str, torch.Tensor], clock: int) -> list[dict]:
        """Send gradients (by parameter name; any float dtype; None for a parameter that got no
        gradient, which the servers then do not step, as torch.optim skips it) for `clock`;
        returns one result per shard: {"outcome", "version", "staleness"}."""
        assert self._codec is not None, "register first"
        jobs = self._codec.layout(self._codec.dtypes(grads), self._wide())
        return self._outcomes(jobs, lambda: self._t.run(self._push_parts(grads, clock, jobs)))

    def _wide(self) -> frozenset[int]:
        """The shards reached through shared memory now (their requests group more slices)."""
        return frozenset(k for k in range(len(self.servers)) if self._t.path(k) == "shm")

    def _outcomes(self, jobs: Sequence[Job], responses) -> list[dict]:
        """One result per shard from `responses()` ((shard, response) pairs). With top-k error
        feedback, what was sent to a shard that did not take it (DROPPED, EVICTED, or a push
        that failed) is owed again, so no gradient entry is lost."""
        comp = self._compressor
        try:
            results = push_results(responses())
        except BaseException as e:  # owe again what the shards that did not take it were sent
            taken = getattr(e, "taken_shards", None)
            comp.restore(list(comp.sent) if taken is None else
                         [s.key for job in jobs if job[0] not in taken for s in job[2]])
            comp.settled()
            raise
        if comp.sparse:
            lost = {shard for shard, r in zip(sorted({job[0] for job in jobs}), results)
                    if r["outcome"] in ("DROPPED", "EVICTED")}
            comp.restore([s.key for job in jobs if job[0] in lost for s in job[2]])
            comp.settled()
        return results

    async def _push_parts(self, grads: Mapping[str, torch.Tensor], clock: int,
                          jobs: Sequence[Job]) -> list[tuple[int, pb.PushResponse]]:
        flat = self._codec.split(grads)
        sent = []
        for job in jobs:  # each part goes out once encoded
            req = self._push_request(clock, job, flat)
            sent.append((job, req, asyncio.ensure_future(self._try(job[0], "Push", req))))
        return await self._settle(sent, clock)

    def push_pull(self, grads: Mapping[str, torch.Tensor], clock: int, names: Sequence[str] | None = None,
                  into: Mapping[str, torch.Tensor] | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """`push(grads, clock)` then `pull(clock + 1, names=names, into=into)`, in one round trip
        per shard when each shard's push and pull fit in one request (small models); otherwise
        the two calls one after the other (so too through shared memory for a shard's pull of
        BY_REFERENCE bytes or more: its answer by reference saves more than a round trip).
        Returns (push results, weights). If any shard answers EVICTED, the weights are not pulled
        (the dict is empty): pull at `clock_floor`."""
        assert self._codec is not None, "register first"
        wide = self._wide()
        jobs = self._codec.layout(self._codec.dtypes(grads), wide)
        pull_batches = self._codec.batches_for(names, wide)
        # One round trip per shard when each shard's push and pull fit one request, unless a pull
        # through shared memory is large enough for its answer by reference (a PushPull's is
        # written into the answer area) to save more than the extra round trip.
        single = all(sum(1 for job in jobs if job[0] == k) == 1 and len(pull_batches[k]) == 1
                     and not (k in wide and answer_bytes(pull_batches[k][0]) >= BY_REFERENCE)
                     for k in range(len(self.servers)))
        if not single:
            results = self.push(grads, clock)
            if any(r["outcome"] == "EVICTED" for r in results):
                return results, {}
            return results, self.pull(clock + 1, names=names, into=into)
        flat = self._codec.split(grads)
        rejoin = self._m.rejoiner(clock)
        pulled = Pulled(self.plan, self.servers, names, into, self._mirrors, self._mirrors.prepare(into))

        async def one(job: Job) -> tuple[int, pb.PushResponse]:
            shard = job[0]
            req = wire.push_pull_request_frame(self._push_request(clock, job, flat),
                                               [s.key for s in pull_batches[shard][0]])
            resp = await self._t.call(shard, "PushPull", req, rejoin=rejoin, waits=True,
                                      answer_bytes=answer_bytes(pull_batches[shard][0]))
            if isinstance(resp, wire.Malformed):
                raise InvalidArgument(f"server {self.servers[shard]} sent a {resp.reason}")
            if resp.push.outcome in TAKEN:
                taken.add(shard)
            if resp.push.outcome != pb.PushResponse.EVICTED:
                pulled.absorb(shard, resp.pull)
            return shard, resp.push

        taken: set[int] = set()
        seen = self._t.recoveries

        def responses():
            try:
                return self._t.run(gather_all([one(job) for job in jobs]))
            except PSError as e:
                e.taken_shards = taken
                raise

        results = self._outcomes(jobs, responses)
        if any(r["outcome"] == "EVICTED" for r in results):
            return results, {}
        if self._t.recoveries != seen:  # some shard answered only after an outage: see `_pull`
            pulled.drain()
            return results, self.pull(clock + 1, names=names, into=into)
        return results, self._installed(pulled)

    def push_stream(self, clock: int, dtypes: Mapping[str, torch.dtype]) -> PushStream:
        """A push for `clock` of the tensors named in `dtypes` whose gradients are handed over one
        by one (`PushStream.add`, e.g. as backward produces them): each request goes out the
        moment all its gradients are in, so sending overlaps the rest of backward."""
        return PushStream(self, clock, dtypes)

    # -- server-held embedding tables (ps.tables, ps.embedding) -------------------------------
    def init_tables(self, specs: Sequence[TableSpec]) -> str:
        """Declare server-held tables on every shard (idempotent; the first worker creates them,
        later ones must declare the same); returns the tables' consistency mode."""
        req = pb.InitTablesRequest(worker_id=self.worker_id, tables=[table_spec_to_proto(s) for s in specs])
        self._tables_request = req

        async def go():
            return await gather_all([self._t.call(k, "InitTables", req) for k in range(len(self.servers))])

        answers = self._t.run(go())
        self.tables = {s.name: s for s in specs}
        self.table_versions = [r.version for r in answers]
        self.table_mode = answers[0].mode
        return self.table_mode

    async def _table_call(self, shard: int, method: str, request, **kwargs):
        """A table call; a shard that no longer knows the tables (it restarted from a checkpoint
        older than their declaration) is told them again, and the call sent again."""
        try:
            return await self._t.call(shard, method, request, **kwargs)
        except UnknownTable:
            if self._tables_request is None:
                raise
            log.warning("server %s (shard %d) does not know the tables: declaring them again", self.servers[shard],
                        shard)
            await self._t.call(shard, "InitTables", self._tables_request)
            return await self._t.call(shard, method, request, **kwargs)

    def _table_ids(self, ids: Mapping[str, object]) -> dict[str, np.ndarray]:
        out = {}
        for name, t_ids in ids.items():
            spec = self.tables.get(name)
            if spec is None:
                raise InvalidArgument(f"no table {name!r} was declared (tables: {sorted(self.tables)[:8]})")
            arr = as_ids(t_ids, f"ids of table {name!r}")
            spec.check_ids(arr)
            out[name] = arr
        return out

    def pull_rows(self, clock: int | None, ids: Mapping[str, object]) -> dict[str, torch.Tensor]:
        """Rows of server-held tables: {table: float32 [len(ids), dim]} in the order of the ids
        given (which should be distinct: each travels as often as given). `clock` None: an
        observer read, which never waits; else the tables' mode may make it wait (sync: for
        table step clock - 1)."""
        return self._t.run(self._pull_rows(clock, self._table_ids(ids)))

    def pull_rows_async(self, clock: int | None, ids: Mapping[str, object]) -> concurrent.futures.Future:
        """`pull_rows` in the background (a prefetch); the future resolves to its result."""
        return self._t.submit(self._pull_rows(clock, self._table_ids(ids)))

    async def _pull_rows(self, clock: int | None, ids: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        n = len(self.servers)
        out = {name: torch.empty(len(t_ids), self.tables[name].dim) for name, t_ids in ids.items()}
        where = {name: shard_of(t_ids, n) for name, t_ids in ids.items()}
        worker = "" if clock is None else self.worker_id
        rejoin = None if clock is None else self._m.rejoiner(clock)

        async def fetch(shard: int, batch: list[tuple[str, np.ndarray]]) -> None:
            req = pb.PullRowsRequest(worker_id=worker, clock=clock or 0,
                                     tables=[rows_to_proto(name, ids[name][pos]) for name, pos in batch])
            resp = await self._table_call(shard, "PullRows", req, rejoin=rejoin, waits=clock is not None)
            if len(resp.tables) != len(batch):
                raise InvalidArgument(f"server {self.servers[shard]} answered {len(resp.tables)} tables for {len(batch)}")
            for (name, pos), msg in zip(batch, resp.tables):
                out[name][torch.from_numpy(pos)] = values_from_proto(msg, len(pos), self.tables[name].dim)
                self.table_bytes_pulled += len(msg.values)
            if clock is not None:
                self.table_versions[shard] = max(self.table_versions[shard], resp.version)

        jobs = []
        for k in range(n):
            batch, size = [], 0
            for name, t_ids in ids.items():
                pos = np.flatnonzero(where[name] == k)
                step = max(1, ROWS_REQUEST_BYTES // (4 * self.tables[name].dim))
                for start in range(0, len(pos), step):  # large reads go as several requests
                    part = pos[start:start + step]
                    if batch and size + 4 * self.tables[name].dim * len(part) > ROWS_REQUEST_BYTES:
                        jobs.append(fetch(k, batch))
                        batch, size = [], 0
                    batch.append((name, part))
                    size += 4 * self.tables[name].dim * len(part)
            if batch:
                jobs.append(fetch(k, batch))
        await gather_all(jobs)
        return out

    def push_rows(self, clock: int, grads: Mapping[str, tuple[object, torch.Tensor]]) -> list[dict]:
        """Send one step's table gradients {table: (distinct ids, float32 [len(ids), dim])}: one
        request to every shard (those holding none of the rows get an empty one, which moves
        this worker's table clock there). Per shard: outcome, version and staleness."""
        ids = self._table_ids({name: g[0] for name, g in grads.items()})
        n = len(self.servers)
        parts = {}  # table -> (ids, values) in shard order (this client's buffers), and where each shard's start
        for name, (_, g) in grads.items():
            values = torch.as_tensor(g).detach().to("cpu", torch.float32)
            self.tables[name].check_grads(len(ids[name]), values)  # here too: no shard may take a part
            where = shard_of(ids[name], n)
            order = np.argsort(where, kind="stable")
            id_buf, value_buf = self._row_buffers(name, len(order))
            np.take(ids[name], order, out=id_buf)
            torch.index_select(values, 0, torch.from_numpy(order), out=value_buf)
            parts[name] = (id_buf, value_buf.numpy(), np.searchsorted(where[order], np.arange(n + 1)))
        for k in range(n):  # a step's rows for one shard go in one request: refused before any is sent
            size = sum(int(at[k + 1] - at[k]) * (8 + 4 * self.tables[name].dim) for name, (_, _, at) in parts.items())
            if size > MAX_MESSAGE_BYTES - MESSAGE_HEADROOM_BYTES:
                raise InvalidArgument(f"a push of {size} bytes of rows to shard {k} is more than one message takes "
                                      f"({MAX_MESSAGE_BYTES - MESSAGE_HEADROOM_BYTES}): push fewer rows per step")
        rejoin = self._m.rejoiner(clock)

        async def send(shard: int) -> dict:
            tables = [wire.rows_frame(name, id_buf[at[shard]:at[shard + 1]], value_buf[at[shard]:at[shard + 1]])
                      for name, (id_buf, value_buf, at) in parts.items() if at[shard + 1] > at[shard]]
            req = wire.rows_message_frame(pb.PushRowsRequest(worker_id=self.worker_id, clock=clock,
                                                             base_version=self.table_versions[shard]), tables)
            resp = await self._table_call(shard, "PushRows", req, rejoin=rejoin)
            return {"outcome": pb.PushResponse.Outcome.Name(resp.outcome), "version": resp.version,
                    "staleness": resp.staleness}

        return self._t.run(gather_all([send(k) for k in range(n)]))

    def _row_buffers(self, table: str, n: int) -> tuple[np.ndarray, torch.Tensor]:
        """This client's buffers for `n` ids and rows of `table` in a push, reused from push to push
        (a push returns once every shard has answered, so nothing reads them after)."""
        id_buf, value_buf = self._push_buffers.get(table, (np.empty(0, np.int64), None))
        if len(id_buf) < n:
            id_buf, value_buf = np.empty(n, np.int64), torch.empty(n, self.tables[table].dim)
            self._push_buffers[table] = (id_buf, value_buf)
        return id_buf[:n], value_buf[:n]

    def stats(self) -> list[dict]:
        """Every shard's Stats (needs no registration)."""
        async def go():
            return await gather_all([self._t.call(k, "Stats", pb.StatsRequest()) for k in range(len(self.servers))])

        return [stats_from_proto(r) for r in self._t.run(go())]

    def leave(self) -> None:
        """Tell every shard this worker is done (sync steps stop waiting for it). Heartbeats stop
        and the client no longer registers again by itself."""
        self._t.run(self._m.leave())

    def close(self) -> None:
        """Stop heartbeats, cancel what is still in flight, close the channels."""
        self._t.close()

    def __enter__(self) -> "PSClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
