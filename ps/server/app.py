"""Build a running ps-server: gRPC server, servicer, health checking, reflection, eviction."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ps import local, tcp, tls, wire
from ps.config import ServerConfig, checkpoint_interval, grpc_options
from ps.errors import PSError
from ps.server import checkpoint, metrics
from ps.server.auth import TokenInterceptor
from ps.server.optim import warm_up
from ps.server.servicer import ParameterServerServicer
from ps.server.shard import Shard

log = logging.getLogger("ps.server")
SERVICE_NAME = wire.SERVICE


class BindError(PSError, OSError):
    """The server's address cannot be bound: in use, or not an address of this machine."""

    code = "UNAVAILABLE"


def check_bindable(host: str, port: int) -> None:
    """Raise BindError, with the reason, when no socket can listen on host:port. Asked before
    gRPC binds, whose own failure names no reason (and logs a line of its own)."""
    address = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise BindError(f"cannot bind {address}: host {host!r} does not resolve ({e.strerror})") from None
    failures = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds: TIME_WAIT is no obstacle
            try:
                probe.bind(sockaddr)
            except OSError as e:
                failures.append(e)
    # gRPC listens on every resolved address it can bind: one in use would split the clients.
    if any(e.errno == errno.EADDRINUSE for e in failures):
        raise BindError(f"address in use: {address} (another process listens there)")
    if failures and len(failures) == len(infos):
        if failures[0].errno == errno.EADDRNOTAVAIL:
            raise BindError(f"cannot bind {address}: {host} is not an address of this machine")
        raise BindError(f"cannot bind {address}: {failures[0].strerror}")


class RunningServer:
    """A started server, serving from an event loop on a thread of its own; `stop()` ends it.
    `port` is the bound port (useful with port 0)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, server: grpc.aio.Server, port: int,
                 shard: Shard, health_servicer, pool: ThreadPoolExecutor, stop_reaper: threading.Event,
                 checkpointer: "Checkpointer | None", http, metrics_port: int,
                 local_server: "local.LocalServer | None" = None, tcp_server: "tcp.TcpServer | None" = None):
        self._loop, self._thread, self.server, self.port, self.shard = loop, thread, server, port, shard
        self.health, self._pool, self._stop_reaper = health_servicer, pool, stop_reaper
        self.checkpointer, self.metrics, self.metrics_port = checkpointer, http, metrics_port
        self.local, self.tcp = local_server, tcp_server
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.shard.cfg.host}:{self.port}"

    def _on_loop(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def stop(self, grace: float | None = 1.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._on_loop(self.health.enter_graceful_shutdown())
        self._stop_reaper.set()
        self.shard.stop()
        for listener in (self.local, self.tcp):
            if listener is not None:
                self._on_loop(listener.stop())
        self._on_loop(self.server.stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._pool.shutdown(wait=True)
        if self.metrics is not None:
            self.metrics.shutdown()
            self.metrics.server_close()
        if self.checkpointer is not None:  # after the last RPC: nothing is lost on a clean stop
            self.checkpointer.save()

    def wait(self) -> None:
        self._thread.join()


class Checkpointer:
    """Writes the shard's checkpoints on a thread of its own: once as soon as the shard is
    initialised (a server that dies before its first interval comes back with the initial
    weights, not empty), then every `checkpoint_every` (seconds or updates); a failed write is
    logged and the previous checkpoint stays."""

    def __init__(self, shard: Shard, stop: threading.Event):
        self.shard, self._stop = shard, stop
        self.seconds, self.steps = checkpoint_interval(shard.cfg.checkpoint_every)
        self._saved_version = shard.version
        self._saved_tables = self._tables_state()
        self._saved_init = shard.store.initialized  # restored: its checkpoint is on disk already
        self._lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True, name="ps-checkpoint").start()

    def _tables_state(self) -> tuple[int, int]:
        """What tells whether the tables moved since a save: their version and how many there are."""
        return self.shard.tables.version, len(self.shard.tables.tables)

    def save(self) -> str | None:
        with self._lock:
            snap, tables = self.shard.snapshot(), self._tables_state()  # (tables: read before they are written)
            if snap is None:
                return None
            try:
                path = checkpoint.save(self.shard.cfg.checkpoint_dir, snap, self.shard.tables,
                                       self.shard.cfg.checkpoint_chunk_bytes)
            except OSError as e:
                log.error("shard %d: checkpoint at version %d failed: %s", self.shard.cfg.shard_id, snap.version, e)
                return None
            self._saved_version = snap.version
            self._saved_tables = tables
            self.shard.count("checkpoints")
            log.info("shard %d: checkpoint %s", self.shard.cfg.shard_id, path)
            return path

    def _loop(self) -> None:
        last = time.monotonic()
        # Checked often when counting updates, so at most about one interval is ever lost.
        while not self._stop.wait(0.1 if self.seconds else 0.01):
            if not self._saved_init and self.shard.store.initialized:
                self._saved_init = True  # one try: a failed write is logged and the schedule goes on
                self.save()
                last = time.monotonic()
                continue
            changed = self.shard.version != self._saved_version or self._tables_state() != self._saved_tables
            due = (time.monotonic() - last >= self.seconds if self.seconds
                   else self.shard.version - self._saved_version >= self.steps)
            if changed and due:
                self.save()
                last = time.monotonic()


def _reap(shard: Shard, stop: threading.Event) -> None:
    interval = min(1.0, shard.cfg.worker_timeout / 4)
    while not stop.wait(interval):
        try:
            shard.evict_expired()
            # evictions, the quorum's or a restore's deadline: table steps may go on (not waiting for
            # a checkpoint of the tables: evictions go on meanwhile; the next pass settles them)
            shard.tables.settle(wait=False)
        except Exception:  # noqa: BLE001 - a bug here must not end evictions for good
            log.exception("shard %d: eviction pass failed", shard.cfg.shard_id)


async def _serve(shard: Shard, pool: ThreadPoolExecutor) -> tuple:
    """Build and start the aio server on the running loop: (server, port, health servicer)."""
    scfg = shard.cfg
    refused = lambda: shard.count("unauthenticated")  # noqa: E731
    interceptors = (TokenInterceptor(scfg.auth_token, refused),) if scfg.auth_token else ()
    # so_reuseport off: a second server on a port in use must fail, not share the port.
    server = grpc.aio.server(options=grpc_options() + [("grpc.so_reuseport", 0)], interceptors=interceptors)
    servicer = ParameterServerServicer(shard, pool, scfg.max_inflight_bytes, scfg.shm)
    server.add_generic_rpc_handlers((wire.handler(servicer),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{scfg.host}:{scfg.port}"
    try:
        port = (server.add_secure_port(address, tls.server_credentials(scfg.tls_cert, scfg.tls_key, scfg.tls_ca))
                if scfg.tls_cert else server.add_insecure_port(address))
    except RuntimeError as e:  # grpc.aio raises where the threaded server returned 0
        raise BindError(f"could not bind {address}: address in use or not an address of this machine") from e
    if port == 0:
        raise BindError(f"could not bind {address}: address in use or not an address of this machine")
    local_server = await _listen_locally(servicer, refused) if servicer.host and local.SUPPORTED else None
    tcp_server = None
    try:
        tcp_server = await _listen_tcp(servicer, refused) if scfg.data_port >= 0 else None
        await server.start()
    except BaseException:
        for listener in (local_server, tcp_server):
            if listener is not None:
                await listener.stop()
        raise
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, port, health_servicer, local_server, tcp_server


async def _listen_tcp(servicer: ParameterServerServicer, refused) -> "tcp.TcpServer | None":
    """The data port (ps.tcp): its frames are served by the same Stream handler. A port given
    that cannot be bound is an error; a free one that cannot be had leaves workers on the gRPC
    stream."""
    cfg = servicer.shard.cfg
    context = tls.server_ssl_context(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.tls_cert else None
    tcp_server = tcp.TcpServer(lambda requests, sink: servicer.Stream(requests, None, sink), cfg.auth_token, refused,
                               context, servicer.buffers, servicer.server_id)
    try:
        port = await tcp_server.start(cfg.host, cfg.data_port)
    except OSError as e:
        if cfg.data_port:
            raise BindError(f"cannot bind the data port {cfg.host}:{cfg.data_port}: {e.strerror or e}") from None
        log.warning("shard %d: no data port for workers on other hosts (%s); they use the gRPC stream",
                    cfg.shard_id, e)
        return None
    servicer.tcp = tcp_server
    log.info("shard %d: data port %d (%s)", cfg.shard_id, port, "TLS" if context else "plain TCP")
    return tcp_server


async def _listen_locally(servicer: ParameterServerServicer, refused) -> "local.LocalServer | None":
    """The co-located channel (ps.local): its frames are served by the same Stream handler."""
    local_server = local.LocalServer(lambda requests, sink: servicer.Stream(requests, None, sink),
                                     servicer.shard.cfg.auth_token, refused, servicer.buffers, servicer.server_id)
    try:
        await local_server.start()
    except OSError as e:  # co-located workers then use the gRPC stream (and the segments) instead
        log.warning("shard %d: no local socket for co-located workers (%s)", servicer.shard.cfg.shard_id, e)
        return None
    servicer.local = local_server
    return local_server


def create_server(cfg: ServerConfig) -> RunningServer:
    """Start serving `cfg` and return at once; the caller owns the returned server."""
    check_bindable(cfg.host, cfg.port)
    warm_up()
    shard = Shard(cfg)
    found = checkpoint.candidates(cfg.checkpoint_dir, cfg.shard_id) if cfg.checkpoint_dir else []
    if cfg.restore or (cfg.restore_if_present and found):
        shard.restore(checkpoint.load_latest(cfg.checkpoint_dir, cfg.shard_id, cfg.num_shards, cfg.mode,
                                                      cfg.table_mode))
    elif found:  # a fresh run would mix its checkpoints with an earlier run's (and prune its own)
        raise checkpoint.CheckpointError(
            f"checkpoint_dir ({cfg.checkpoint_dir!r}) holds checkpoints of shard {cfg.shard_id} from an earlier run "
            f"(newest {os.path.basename(found[0])}): pass --restore or --restore-if-present to resume it, or use "
            "an empty directory")
    pool = ThreadPoolExecutor(max_workers=cfg.threads, thread_name_prefix=f"ps-shard{cfg.shard_id}")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name=f"ps-server-loop-{cfg.shard_id}")
    thread.start()
    try:
        server, port, health_servicer, local_server, tcp_server = asyncio.run_coroutine_threadsafe(
            _serve(shard, pool), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        pool.shutdown(wait=False)
        raise
    stop = threading.Event()
    threading.Thread(target=_reap, args=(shard, stop), daemon=True, name="ps-reaper").start()
    checkpointer = Checkpointer(shard, stop) if cfg.checkpoint_dir else None
    http, metrics_port = metrics.serve(shard, cfg.host, cfg.metrics_port) if cfg.metrics_port >= 0 else (None, -1)
    if http is not None:
        log.info("shard %d: Prometheus metrics on http://%s:%d/metrics", cfg.shard_id, cfg.host, metrics_port)
    return RunningServer(loop, thread, server, port, shard, health_servicer, pool, stop, checkpointer, http,
                         metrics_port, local_server, tcp_server)
