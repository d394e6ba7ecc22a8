"""Build a running ps-server: gRPC server, servicer, health checking, reflection, eviction."""

from __future__ import annotations

import logging
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ps import wire
from ps.config import ServerConfig, grpc_options
from ps.server.auth import TokenInterceptor
from ps.server.optim import warm_up
from ps.server.servicer import ParameterServerServicer
from ps.server.shard import Shard

log = logging.getLogger("ps.server")
SERVICE_NAME = wire.SERVICE


@dataclass
class RunningServer:
    """A started server; `stop()` ends it. `port` is the bound port (useful with port 0)."""

    server: grpc.Server
    port: int
    shard: Shard
    health: health.HealthServicer
    _stop_reaper: threading.Event

    @property
    def address(self) -> str:
        return f"{self.shard.cfg.host}:{self.port}"

    def stop(self, grace: float | None = 1.0) -> None:
        self.health.enter_graceful_shutdown()
        self._stop_reaper.set()
        self.shard.stop()
        self.server.stop(grace).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()


def _reap(shard: Shard, stop: threading.Event) -> None:
    interval = min(1.0, shard.cfg.worker_timeout / 4)
    while not stop.wait(interval):
        shard.evict_expired()


def create_server(cfg: ServerConfig) -> RunningServer:
    """Start serving `cfg` and return at once; the caller owns the returned server."""
    warm_up()
    shard = Shard(cfg)
    interceptors = (TokenInterceptor(cfg.auth_token),) if cfg.auth_token else ()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.threads), options=grpc_options(),
                         interceptors=interceptors)
    server.add_generic_rpc_handlers((wire.handler(ParameterServerServicer(shard)),))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise OSError(f"could not bind {cfg.host}:{cfg.port}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = threading.Event()
    threading.Thread(target=_reap, args=(shard, stop), daemon=True, name="ps-reaper").start()
    return RunningServer(server, port, shard, health_servicer, stop)
