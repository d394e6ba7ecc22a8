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

If a shard evicts the worker (silent past the timeout), the next call registers again by itself;
pushes below `client.clock_floor` are then answered DUPLICATE, so continue from
`max(clock, client.clock_floor)` (the trainer does).

Tensors passed to `push` are read before it returns (or before the handle of `push_async`
resolves); the caller must not modify them until then. One client serves one worker; its
methods may be called from one thread at a time (the heartbeat thread is internal), except
that a `prefetch` runs in the background and a `push_stream` may be fed from another thread
(e.g. autograd's) while the caller pushes or pulls.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import grpc
import torch

from ps import tls, wire
from ps.compress import Compressor
from ps.config import DEFAULT_PARTITION_BYTES, OptimizerConfig, grpc_options
from ps.errors import InvalidArgument, PSError, Unavailable, UnknownWorker, error_from_wire
from ps.proto import ps_pb2 as pb
from ps.serde import (optimizer_to_proto, plan_to_proto, sparse_frame, stats_from_proto, tensor_frame, tensor_into,
                      tensor_to_proto)
from ps.server.auth import bearer
from ps.server.servicer import ERROR_CLASS_KEY
from ps.sharding import ParamSpec, Plan, Slice, dtype_name, make_plan

log = logging.getLogger("ps.worker")
T = TypeVar("T")
_DEFAULT = object()  # "use the client's rpc_timeout"


def _batches(slices: Sequence[Slice], limit: int, nbytes: Callable[[Slice], int] = lambda s: 4 * s.length
             ) -> list[list[Slice]]:
    """Group slices into requests of at most `limit` bytes (a slice alone may reach the limit)."""
    out: list[list[Slice]] = [[]]
    size = 0
    for s in slices:
        n = nbytes(s)
        if out[-1] and size + n > limit:
            out.append([])
            size = 0
        out[-1].append(s)
        size += n
    return out


def _decodable(t: torch.Tensor | None, shape: tuple[int, ...]) -> bool:
    return (t is not None and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
            and tuple(t.shape) == tuple(shape))


def _push_results(responses: Iterable[tuple[int, pb.PushResponse]]) -> list[dict]:
    """One result per shard: the outcome of its last part (parts before it are BUFFERED)."""
    final: dict[int, dict] = {}
    for shard, resp in responses:
        outcome = pb.PushResponse.Outcome.Name(resp.outcome)
        if outcome != "BUFFERED" or shard not in final:
            final[shard] = {"outcome": outcome, "version": resp.version, "staleness": resp.staleness}
    return [final[k] for k in sorted(final)]


def _mapped(e: grpc.RpcError) -> PSError:
    """The PSError a failed call stands for (the class the server raised, or its status code's)."""
    meta = dict(e.trailing_metadata() or ())
    return error_from_wire(e.code().name, meta.get(ERROR_CLASS_KEY), e.details() or "")


class _Pulled:
    """The destination of one pull: tensors to decode into, versions seen per shard."""

    def __init__(self, client: "PSClient", names: Sequence[str] | None, into: Mapping[str, torch.Tensor] | None):
        plan = client.plan
        wanted = plan.specs if names is None else {n: plan.specs[n] for n in names}
        self.client, self.given = client, dict(into or {})
        self.out = {n: self.given[n] if _decodable(self.given.get(n), spec.shape)
                    else torch.empty(spec.shape, dtype=torch.float32) for n, spec in wanted.items()}
        self.versions: dict[int, int] = {}
        self.min_clocks: dict[int, int] = {}
        self._lock = threading.Lock()

    def absorb(self, shard: int, resp: wire.PullIn | wire.Malformed) -> None:
        """Decode one answer straight into place (thread-safe: answers may arrive concurrently)."""
        plan = self.client.plan
        if isinstance(resp, wire.Malformed):
            raise InvalidArgument(f"server {self.client.servers[shard]} sent a {resp.reason}")
        for t in resp.tensors:
            s = plan.by_key.get(t.key)
            if s is None or s.name not in self.out:
                raise InvalidArgument(f"server {self.client.servers[shard]} sent key {t.key!r}, which was not asked for")
            tensor_into(t, self.out[s.name].view(-1)[s.start : s.start + s.length])
        with self._lock:
            self.versions[shard] = min(self.versions.get(shard, resp.header.version), resp.header.version)
            self.min_clocks[shard] = resp.header.min_clock

    def finish(self, observer: bool) -> dict[str, torch.Tensor]:
        self.client.last_min_clocks = self.min_clocks
        if not observer:
            for shard, v in self.versions.items():
                self.client.versions[shard] = v
        with torch.no_grad():
            for n, t in self.given.items():
                if n in self.out and self.out[n] is not t:
                    t.copy_(self.out[n])
        return self.out


class PushStream:
    """One push whose gradients arrive tensor by tensor (`PSClient.push_stream`). Requests go out
    as soon as all their gradients are in (a shard that holds none of these tensors gets its
    empty push, which moves this worker's clock there, at once); `finish` sends zeros for
    tensors never added (a parameter that got no gradient), waits and returns one result per
    shard, as `push` does. A tensor handed to `add` is read until `finish` returns: do not
    modify it before. `add` may be called from any one thread at a time (e.g. autograd's)."""

    def __init__(self, client: "PSClient", clock: int, dtypes: Mapping[str, torch.dtype]):
        self.client, self.clock, self.dtypes = client, clock, dict(dtypes)
        self._jobs = client._push_layout(self.dtypes)
        self._flat: dict[str, torch.Tensor] = {}
        self._request = client._push_encoder(clock, self._flat)
        self._missing = [{s.name for s in job[2]} for job in self._jobs]
        self._jobs_of: dict[str, list[int]] = {}
        for i, names in enumerate(self._missing):
            for n in names:
                self._jobs_of.setdefault(n, []).append(i)
        self._added: set[str] = set()
        self._issued: list[tuple[tuple, grpc.Future]] = []
        self._lock = threading.Lock()
        for i, names in enumerate(self._missing):
            if not names:
                self._send(i)

    def _send(self, i: int) -> None:
        job = self._jobs[i]
        self._issued.append(self.client._issue((job[0], "Push", self._request(*job), self.client.rpc_timeout)))

    def has(self, name: str) -> bool:
        return name in self._added

    def add(self, name: str, grad: torch.Tensor) -> None:
        """The gradient of `name` is final: send every request it completes."""
        if name not in self.dtypes:
            raise InvalidArgument(f"gradient {name!r} is not part of this push (expected one of {sorted(self.dtypes)[:5]})")
        spec = self.client.plan.specs[name]
        if tuple(grad.shape) != tuple(spec.shape):
            raise InvalidArgument(f"gradient {name!r} has shape {tuple(grad.shape)}, expected {tuple(spec.shape)}")
        with self._lock:
            if name in self._added:
                raise InvalidArgument(f"gradient {name!r} was already added to the push for step {self.clock}")
            self._flat.update(self.client.plan.split({name: self.client._on_wire(grad.to(self.dtypes[name]))}, [name]))
            self._added.add(name)
            for i in self._jobs_of.get(name, ()):
                self._missing[i].discard(name)
                if not self._missing[i]:
                    self._send(i)

    def finish(self) -> list[dict]:
        for name in [n for n in self.dtypes if n not in self._added]:
            self.add(name, torch.zeros(self.client.plan.specs[name].shape, dtype=self.dtypes[name]))
        return _push_results(self.client._collect(self._issued, self.clock))


class Prefetch:
    """Weights being pulled in the background (`PSClient.prefetch`)."""

    def __init__(self, future: Future):
        self._future = future

    def install(self, into: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Wait, write the weights into `into` {name: tensor}, and count the versions read as this
        worker's (the base of its next push)."""
        pulled: _Pulled = self._future.result()
        pulled.given = dict(into)
        return pulled.finish(observer=False)

    def cancel(self) -> None:
        """Drop it (wait for it to end; errors too are dropped)."""
        try:
            self._future.result()
        except Exception as e:  # noqa: BLE001 - nobody needs these weights any more
            log.debug("dropped prefetch ended with %s", e)


class PSClient:
    def __init__(self, servers: Sequence[str], worker_id: str | None = None, *,
                 partition_bytes: int = DEFAULT_PARTITION_BYTES, connect_timeout: float = 60.0,
                 retry_timeout: float = 60.0, rpc_timeout: float = 120.0, heartbeat: bool = True,
                 compress: str = "none", auth_token: str = "", tls_ca: str = "", tls_cert: str = "",
                 tls_key: str = ""):
        if not servers:
            raise PSError("servers must name at least one host:port")
        self._compressor = Compressor(compress)  # validates the spec
        self._metadata = bearer(auth_token) if auth_token else None
        self.servers = list(servers)
        self.worker_id = worker_id or f"worker-{uuid.uuid4().hex[:8]}"
        self.partition_bytes = partition_bytes
        self.retry_timeout = retry_timeout
        self.rpc_timeout = rpc_timeout
        self._channels = [tls.channel(s, grpc_options(), tls_ca, tls_cert, tls_key) for s in self.servers]
        self._stubs = [wire.Stub(c) for c in self._channels]
        # Pulls may wait (sync, ssp) and must never hold up a heartbeat: a pool of their own.
        # Pushes of several requests go out as gRPC futures; push_pull (one request per shard)
        # makes blocking calls, on this pool for all but the first shard.
        width = max(8, 4 * len(self.servers))  # requests in flight: enough to keep every server busy
        self._pool = ThreadPoolExecutor(max_workers=len(self.servers), thread_name_prefix="ps-client")
        self._pull_pool = ThreadPoolExecutor(max_workers=width, thread_name_prefix="ps-pull")
        self._beat_pool = ThreadPoolExecutor(max_workers=len(self.servers), thread_name_prefix="ps-heartbeat")
        self._async = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ps-client-async")
        self._left = False
        self._rejoin = threading.Lock()
        self._floor_lock = threading.Lock()
        self.clock_floor = 0  # the lowest clock the servers will take from this worker
        self._want_heartbeat = heartbeat
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self.plan: Plan | None = None
        self.info: list[pb.RegisterResponse] = []
        self.versions: list[int] = [0] * len(self.servers)
        self._wait_connected(connect_timeout)

    # -- plumbing ---------------------------------------------------------------------------
    def _wait_connected(self, timeout: float) -> None:
        for addr, ch in zip(self.servers, self._channels):
            try:
                grpc.channel_ready_future(ch).result(timeout=timeout)
            except grpc.FutureTimeoutError as e:
                raise Unavailable(f"server {addr} did not answer within {timeout:.0f}s") from e

    def _call(self, shard: int, method: str, request, timeout: float | None | object = _DEFAULT,
              reregister: bool = True, retry: bool = True, clock: int = 0):
        """One RPC with errors mapped to PSError; retries while the server is unavailable and
        registers again (then retries) if the server evicted this worker or restarted without
        it. `clock`: the request's clock, this worker's clock, told to the server when
        registering again with the newest version of it this worker has read (a server restored
        from a checkpoint learns from them where training is).
        timeout None: no deadline (a pull that may wait for other workers)."""
        deadline = time.monotonic() + self.retry_timeout
        delay = 0.05
        rpc_timeout = self.rpc_timeout if timeout is _DEFAULT else timeout
        while True:
            try:
                return getattr(self._stubs[shard], method)(request, timeout=rpc_timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                err = _mapped(e)
                if isinstance(err, UnknownWorker) and reregister and not self._left and self.plan is not None:
                    log.warning("%s: %s; registering again", self.servers[shard], err)
                    # With every shard, aligned: evicted by one shard, a worker has usually been
                    # evicted by all, and each would otherwise place it at its own current step.
                    with self._rejoin:  # one re-registration at a time (a prefetch may run beside)
                        self._join_all(clock)
                    reregister = False
                    continue
                if retry and isinstance(err, Unavailable) and time.monotonic() + delay < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                raise err from e

    def _call_many(self, calls: Iterable[tuple[int, str, object, float | None]], clock: int = 0
                   ) -> list[tuple[int, object]]:
        """Issue each (shard, method, request, timeout) as a gRPC future as soon as it is built (no
        Python threads in between; encoding overlaps sending) and return (shard, response) pairs
        in order (see `_collect`)."""
        return self._collect([self._issue(call) for call in calls], clock)

    def _issue(self, call: tuple[int, str, object, float | None]) -> tuple[tuple, grpc.Future]:
        shard, method, request, timeout = call
        return call, getattr(self._stubs[shard], method).future(request, timeout=timeout, metadata=self._metadata)

    def _collect(self, issued: Sequence[tuple[tuple, grpc.Future]], clock: int = 0) -> list[tuple[int, object]]:
        """Wait for issued calls; (shard, response) pairs in their order. A call that fails because
        the server was unreachable or no longer knew this worker is redone through `_call` (which
        retries and registers again), and so is every other call to that shard: a restarted
        server has lost the parts of a push it had acknowledged (parts it still holds are
        answered DUPLICATE). Pushes and pulls are safe to repeat; a refused request is not sent
        again."""
        out, redo = [], set()
        for (k, m, req, t), f in issued:
            try:
                out.append((k, f.result()))
            except grpc.RpcError as e:
                err = _mapped(e)
                if not isinstance(err, (Unavailable, UnknownWorker)):
                    raise err from e
                out.append((k, None))
                redo.add(k)
        for i, ((k, m, req, t), _) in enumerate(issued):  # in order: the last part decides the outcome
            if k in redo:
                out[i] = (k, self._call(k, m, req, timeout=t, clock=clock))
        return out

    def _map(self, fn: Callable[..., T], jobs: Sequence[tuple], pool: ThreadPoolExecutor | None = None) -> list[T]:
        """Run fn(*job) for every job concurrently; raise the first error after all finish."""
        if not jobs:
            return []
        futures = [(pool or self._pool).submit(fn, *job) for job in jobs[1:]]
        results, first_error = [], None
        try:  # the first job runs on this thread: one thread hop less for small requests
            results.append(fn(*jobs[0]))
        except Exception as e:  # noqa: BLE001 - re-raised below
            first_error = e
            results.append(None)
        for f in futures:
            try:
                results.append(f.result())
            except Exception as e:  # noqa: BLE001 - re-raised below
                first_error = first_error or e
                results.append(None)
        if first_error is not None:
            raise first_error
        return results

    # -- membership ---------------------------------------------------------------------------
    def _register_one(self, shard: int, clock: int = 0) -> pb.RegisterResponse:
        assert self.plan is not None
        seen = self.versions[shard] if shard < len(self.versions) else 0
        req = pb.RegisterRequest(worker_id=self.worker_id, plan_fingerprint=self.plan.fingerprint, clock=clock,
                                 seen_version=seen)
        resp = self._call(shard, "Register", req, reregister=False)
        with self._floor_lock:  # registrations may run on several threads
            self.clock_floor = max(self.clock_floor, resp.clock)
        return resp

    def attach(self, specs: Sequence[ParamSpec]) -> Plan:
        """Compute the plan for these parameters without joining (enough for observer pulls)."""
        self.plan = make_plan(list(specs), len(self.servers), self.partition_bytes)
        self._pull_batches = [_batches(self.plan.slices_for(k), self.partition_bytes)  # fp32 master copies
                              for k in range(len(self.servers))]
        self._subset_batches: dict[frozenset, list[list[Slice]]] = {}
        self._layouts: dict[tuple, list[tuple[int, int, list[Slice], int]]] = {}
        return self.plan

    def register(self, specs: Sequence[ParamSpec]) -> int:
        """Compute the plan for these parameters, join every shard, start heartbeats; returns the
        clock to start at (the largest any shard asks for)."""
        self.attach(specs)
        self._left = False
        self.info = self._join_all()
        self.versions = [r.version for r in self.info]
        if self._want_heartbeat and self._heartbeat_thread is None:
            self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, daemon=True, name="ps-heartbeat")
            self._heartbeat_thread.start()
        return max(r.clock for r in self.info)

    def _join_all(self, clock: int = 0) -> list[pb.RegisterResponse]:
        """Register with every shard (at least at `clock`) and align: shards that would put this
        worker at a lower clock than another shard are told the highest one, so no shard waits
        for a step this worker will never push there."""
        infos = self._map(self._register_one, [(k, clock) for k in range(len(self.servers))])
        start = max(r.clock for r in infos)
        behind = [k for k, r in enumerate(infos) if r.clock < start]
        for k, r in zip(behind, self._map(self._register_one, [(k, start) for k in behind])):
            infos[k] = r
        return infos

    def _heartbeat_loop(self) -> None:
        """Renew the lease on every shard at once, one attempt each: a shard that is down must
        not delay the others (a worker the shards evicted registers again on its next pull/push)."""
        interval = max(0.05, min(r.worker_timeout for r in self.info) / 4)
        request = pb.WorkerRef(worker_id=self.worker_id)

        def beat(k: int) -> None:
            try:
                self._call(k, "Heartbeat", request, timeout=interval * 2, reregister=False, retry=False)
            except PSError as e:
                log.debug("heartbeat to %s failed: %s", self.servers[k], e)

        while not self._stop.wait(interval):
            list(self._beat_pool.map(beat, range(len(self.servers))))

    def init(self, tensors: Mapping[str, torch.Tensor], optimizer: OptimizerConfig) -> bool:
        """Send initial values and the optimizer; idempotent. True if this call set the values
        (False: the servers already held values, which win; pull to get them)."""
        assert self.plan is not None, "register first"
        flat = self.plan.split({n: t.detach().to("cpu", torch.float32) for n, t in tensors.items()})
        spec, opt = plan_to_proto(self.plan), optimizer_to_proto(optimizer)

        def send(shard: int, part: int, batch: list[Slice], num_parts: int) -> bool:
            req = pb.InitRequest(
                worker_id=self.worker_id, plan_fingerprint=self.plan.fingerprint, plan=spec, optimizer=opt,
                tensors=[tensor_to_proto(s.key, flat[s.key]) for s in batch], part=part, num_parts=num_parts,
            )
            return self._call(shard, "Init", req).applied

        jobs = [(k, i, b, len(bs)) for k, bs in enumerate(self._pull_batches) for i, b in enumerate(bs)]
        return any(self._map(send, jobs))

    def setup(self, tensors: Mapping[str, torch.Tensor], optimizer: OptimizerConfig) -> int:
        """register + init in one call; returns the clock to start at."""
        specs = [ParamSpec(n, tuple(t.shape), dtype_name(t.dtype)) for n, t in tensors.items()]
        clock = self.register(specs)
        self.init(tensors, optimizer)
        return clock

    @property
    def mode(self) -> str:
        """The servers' consistency mode (known once registered)."""
        return self.info[0].mode if self.info else ""

    # -- data ---------------------------------------------------------------------------------
    def pull(self, clock: int, observer: bool = False, names: Sequence[str] | None = None,
             into: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Parameters (all, or `names`) as fp32 CPU tensors, once the servers' mode lets a worker
        at `clock` read. `observer=True` reads without waiting or joining (evaluation, monitoring).
        `into` {name: tensor}: write the values there too; contiguous fp32 CPU tensors (e.g. a CPU
        model's parameters, or pinned buffers) are decoded into directly, with no extra copy."""
        return self._pull_job(clock, observer, names, into)()

    def _batches_for(self, names: Sequence[str] | None) -> list[list[Slice]]:
        if names is None:
            return self._pull_batches
        key = frozenset(names)
        if key not in self._subset_batches:
            self._subset_batches[key] = [_batches([s for s in self.plan.slices_for(k) if s.name in key],
                                                  self.partition_bytes) for k in range(len(self.servers))]
        return self._subset_batches[key]

    def pull_async(self, clock: int, observer: bool = False, names: Sequence[str] | None = None) -> Future:
        """`pull` in the background; the future resolves to its result."""
        return self._async.submit(self._pull_job(clock, observer, names))

    def _pull_job(self, clock: int, observer: bool, names: Sequence[str] | None,
                  into: Mapping[str, torch.Tensor] | None = None, commit: bool = True,
                  own_clock: int | None = None) -> Callable:
        assert self.plan is not None, "register first"
        worker = "" if observer else self.worker_id
        batches = self._batches_for(names)

        def fetch_into(shard: int, batch: list[Slice], pulled: "_Pulled"):
            req = pb.PullRequest(worker_id=worker, plan_fingerprint=self.plan.fingerprint, clock=clock,
                                 keys=[s.key for s in batch])
            pulled.absorb(shard, self._call(shard, "Pull", req, timeout=self.rpc_timeout if observer else None,
                                            clock=clock if own_clock is None else own_clock))

        def gather() -> dict[str, torch.Tensor] | _Pulled:
            pulled = _Pulled(self, names, into)
            self._map(fetch_into, [(k, b, pulled) for k, bs in enumerate(batches) for b in bs], self._pull_pool)
            return pulled.finish(observer) if commit else pulled

        return gather

    def push(self, grads: Mapping[str, torch.Tensor], clock: int) -> list[dict]:
        """Send gradients (by parameter name; any float dtype) for `clock`; returns one result
        per shard: {"outcome", "version", "staleness"}."""
        return self._push_job(grads, clock)()

    def push_async(self, grads: Mapping[str, torch.Tensor], clock: int) -> Future:
        """`push` in the background; the future resolves to its result."""
        return self._async.submit(self._push_job(grads, clock))

    def _push_requests(self, grads: Mapping[str, torch.Tensor], clock: int) -> tuple[list[tuple], Callable]:
        """The push's parts as (shard, part, batch, num_parts) jobs, and a function building each
        job's request (encoding happens there, as late as possible)."""
        names = list(grads)
        jobs = self._push_layout({n: grads[n].dtype for n in names})
        return jobs, self._push_encoder(clock, self.plan.split({n: self._on_wire(grads[n]) for n in names}, names))

    def _on_wire(self, grad: torch.Tensor) -> torch.Tensor:
        """The gradient as it travels: on the CPU, in the wire dtype (no copy when it is already)."""
        return grad.detach().to("cpu", self._compressor.wire_dtype(grad.dtype))

    def _push_layout(self, dtypes: Mapping[str, torch.dtype]) -> list[tuple[int, int, list[Slice], int]]:
        """How a push of these tensors (name: dtype) splits into requests: (shard, part, slices,
        num_parts) jobs. It depends on the names and dtypes only, not on the values."""
        assert self.plan is not None, "register first"
        key = tuple(dtypes.items())
        if key not in self._layouts:  # the same every step: computed once
            self._layouts[key] = self._layout(dtypes)
        return self._layouts[key]

    def _layout(self, dtypes: Mapping[str, torch.dtype]) -> list[tuple[int, int, list[Slice], int]]:
        comp = self._compressor
        size = {n: comp.wire_dtype(d).itemsize for n, d in dtypes.items()}
        nbytes = lambda s: comp.wire_bytes(s.length, size[s.name])  # noqa: E731
        jobs = []
        for k in range(len(self.servers)):
            bs = _batches([s for s in self.plan.slices_for(k) if s.name in size], self.partition_bytes, nbytes)
            jobs += [(k, i, b, len(bs)) for i, b in enumerate(bs)]
        return jobs

    def _push_encoder(self, clock: int, flat: Mapping[str, torch.Tensor]) -> Callable[..., wire.Frame]:
        """request(shard, part, batch, num_parts): one part of the push, from `flat` (wire tensors
        by slice key; read when the request is built)."""
        comp = self._compressor

        def request(shard: int, part: int, batch: list[Slice], num_parts: int) -> wire.Frame:
            header = pb.PushRequest(
                worker_id=self.worker_id, plan_fingerprint=self.plan.fingerprint, clock=clock,
                base_version=self.versions[shard], part=part, num_parts=num_parts,
            )
            if comp.sparse:
                tensors = [sparse_frame(s.key, [s.length], *comp.sparsify(s.key, flat[s.key])) for s in batch]
            else:
                tensors = [tensor_frame(s.key, flat[s.key]) for s in batch]
            return wire.push_frame(header, tensors)

        return request

    def push_stream(self, clock: int, dtypes: Mapping[str, torch.dtype]) -> "PushStream":
        """A push for `clock` of the tensors named in `dtypes` whose gradients are handed over one
        by one (`PushStream.add`, e.g. as backward produces them): each request goes out the
        moment all its gradients are in, so sending overlaps the rest of backward."""
        return PushStream(self, clock, dtypes)

    def prefetch(self, clock: int, names: Sequence[str] | None = None) -> "Prefetch":
        """Start pulling the weights for `clock` in the background (async and ssp modes: while
        this worker computes the step before). The versions read count only once installed."""
        # Should it have to register again, this worker is still at clock - 1 (its push for that
        # step may not have gone out yet): registering at `clock` would make that push a duplicate.
        return Prefetch(self._async.submit(self._pull_job(clock, False, names, commit=False, own_clock=clock - 1)))

    def _push_job(self, grads: Mapping[str, torch.Tensor], clock: int) -> Callable[[], list[dict]]:
        jobs, request = self._push_requests(grads, clock)

        def gather() -> list[dict]:
            calls = ((job[0], "Push", request(*job), self.rpc_timeout) for job in jobs)
            return _push_results(self._call_many(calls, clock))

        return gather

    def push_pull(self, grads: Mapping[str, torch.Tensor], clock: int, names: Sequence[str] | None = None,
                  into: Mapping[str, torch.Tensor] | None = None) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """`push(grads, clock)` then `pull(clock + 1, names=names, into=into)`, in one round trip
        per shard when each shard's push and pull fit in one request (small models); otherwise
        the two calls one after the other. Returns (push results, weights)."""
        jobs, request = self._push_requests(grads, clock)
        batches = self._batches_for(names)
        single = [sum(1 for job in jobs if job[0] == k) == 1 and len(batches[k]) == 1 for k in range(len(self.servers))]
        if not all(single):
            return _push_results(self._call_many(((j[0], "Push", request(*j), self.rpc_timeout) for j in jobs), clock)), \
                self.pull(clock + 1, names=names, into=into)
        pulled = _Pulled(self, names, into)

        def one(job: tuple) -> tuple[int, pb.PushResponse]:
            shard = job[0]
            req = wire.push_pull_request_frame(request(*job), [s.key for s in batches[shard][0]])
            resp = self._call(shard, "PushPull", req, timeout=None, clock=clock)  # the pull half may wait
            if isinstance(resp, wire.Malformed):
                raise InvalidArgument(f"server {self.servers[shard]} sent a {resp.reason}")
            pulled.absorb(shard, resp.pull)
            return shard, resp.push

        # Blocking calls, the first on this thread: a gRPC future starts a thread whenever none
        # of the channel's calls is in flight (two bare 1 KiB echoes: 0.99 ms as futures, 0.67 ms
        # as blocking calls on two threads).
        pushed = self._map(one, [(job,) for job in jobs], self._pull_pool)
        return _push_results(pushed), pulled.finish(observer=False)

    def stats(self) -> list[dict]:
        return [stats_from_proto(r) for r in self._map(lambda k: self._call(k, "Stats", pb.StatsRequest()), [(k,) for k in range(len(self.servers))])]

    def leave(self) -> None:
        """Tell every shard this worker is done (sync steps stop waiting for it). Heartbeats stop
        and the client no longer registers again by itself."""
        self._left = True
        self._stop_heartbeat()
        self._map(lambda k: self._call(k, "Leave", pb.WorkerRef(worker_id=self.worker_id), reregister=False),
                  [(k,) for k in range(len(self.servers))])

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join()
            self._heartbeat_thread = None

    def close(self) -> None:
        """Stop heartbeats, cancel what is still in flight, close the channels."""
        self._stop_heartbeat()
        for ch in self._channels:
            ch.close()  # in-flight RPCs (a waiting pull) end with CANCELLED
        for pool in (self._async, self._pull_pool, self._pool, self._beat_pool):
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PSClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
