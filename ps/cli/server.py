"""ps-server: one shard of the parameter server."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from typing import Mapping, Sequence

from ps.cli.common import (add_auth_flags, add_flag, add_tls_flags, auth_token_from_args, cluster_env, run_main,
                           setup_logging)
from ps.config import MODES, ServerConfig
from ps.server.app import create_server

log = logging.getLogger("ps.server")
READY_PREFIX = "ps-server listening on "


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ps-server", description="Serve one shard of the parameter server. "
                                "A TF_CONFIG cluster spec in the environment gives defaults for the shard flags.")
    env = cluster_env(os.environ if env is None else env)
    add_flag(p, "--host", env=env, default="127.0.0.1", help="address to bind (loopback unless you mean it)")
    add_flag(p, "--port", env=env, default=0, type=int, help="port to bind; 0 picks a free one (printed)")
    add_flag(p, "--shard-id", env=env, default=0, type=int, help="this server's shard index")
    add_flag(p, "--num-shards", env=env, default=1, type=int, help="number of server shards")
    add_flag(p, "--mode", env=env, default="sync", choices=MODES, help="consistency mode")
    add_flag(p, "--staleness", env=env, default=0, type=int, help="ssp bound s: a worker at clock c waits for c - s")
    add_flag(p, "--table-mode", env=env, default="", choices=("", *MODES),
             help="consistency mode of server-held embedding tables (default: --mode); e.g. --mode sync "
                  "--table-mode async trains dense parameters in sync and tables asynchronously (hybrid)")
    add_flag(p, "--table-staleness", env=env, default=-1, type=int,
             help="ssp bound of the tables (default: --staleness)")
    add_flag(p, "--num-workers", env=env, default=1, type=int,
             help="data-parallel workers expected at start (sync and ssp wait for them before the first step)")
    add_flag(p, "--worker-timeout", env=env, default=30.0, type=float, help="seconds of silence before eviction")
    add_flag(p, "--staleness-lr", env=env, action="store_true", default=False,
             help="scale the learning rate by 1 / (1 + staleness) (async, ssp)")
    add_flag(p, "--backup-workers", env=env, default=0, type=int,
             help="sync: a step completes when all but this many workers have pushed (late pushes dropped)")
    add_flag(p, "--progress-timeout", env=env, default=120.0, type=float,
             help="sync, ssp: evict a worker that a waiting step is blocked on when its clock has not moved for "
                  "this many seconds, even if its heartbeat runs (0: never)")
    add_flag(p, "--max-inflight-bytes", env=env, default=1 << 30, type=int,
             help="bytes of requests this shard processes at once; beyond it a request waits briefly, then is "
                  "refused RESOURCE_EXHAUSTED (clients retry with backoff)")
    add_flag(p, "--threads", env=env, default=8, type=int,
             help="threads for the tensor work of large requests (decoding, the optimizer, pull encoding); "
                  "waiting requests hold none")
    add_flag(p, "--no-shm", env=env, action="store_true", default=False,
             help="do not offer shared memory to workers on this host (they use the stream path)")
    add_flag(p, "--data-port", env=env, default=0, type=int,
             help="TCP port where workers on other hosts send tensors (the stream path's frames on a socket "
                  "of their own, with the same token and TLS); 0 picks a free one, -1 offers none (workers then "
                  "use the gRPC stream)")
    add_auth_flags(p, env)
    add_tls_flags(p, env, server=True)
    add_flag(p, "--checkpoint-dir", env=env, default="", help="write checkpoints here (safetensors + JSON)")
    add_flag(p, "--checkpoint-every", env=env, default="60s",
             help="'Ns': every N seconds; 'N': every N applied updates (and always on SIGTERM)")
    add_flag(p, "--checkpoint-chunk-bytes", env=env, default=64 << 20, type=int,
             help="embedding tables are checkpointed and restored in files of about this many bytes each, "
                  "so a table larger than memory allows at once can be saved")
    add_flag(p, "--restore", env=env, action="store_true", default=False,
             help="resume from the newest usable checkpoint in --checkpoint-dir")
    add_flag(p, "--metrics-port", env=env, default=-1, type=int,
             help="serve Prometheus metrics on this port at /metrics (-1: off, 0: a free port)")
    add_flag(p, "--restore-if-present", env=env, action="store_true", default=False,
             help="--restore when --checkpoint-dir holds a checkpoint of this shard, else start fresh "
                  "(for containers that restart)")
    add_flag(p, "--verbose", env=env, action="store_true", default=False, help="debug logging")
    return p


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host, port=int(args.port), shard_id=int(args.shard_id), num_shards=int(args.num_shards),
        mode=args.mode, staleness=int(args.staleness), num_workers=int(args.num_workers),
        table_mode=args.table_mode, table_staleness=int(args.table_staleness),
        checkpoint_chunk_bytes=int(args.checkpoint_chunk_bytes),
        worker_timeout=float(args.worker_timeout), staleness_lr=bool(args.staleness_lr),
        backup_workers=int(args.backup_workers), threads=int(args.threads),
        progress_timeout=float(args.progress_timeout), max_inflight_bytes=int(args.max_inflight_bytes), auth_token=auth_token_from_args(args),
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, restore=bool(args.restore),
        restore_if_present=bool(args.restore_if_present), metrics_port=int(args.metrics_port),
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca, shm=not args.no_shm,
        data_port=int(args.data_port),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(cfg: ServerConfig, stop: threading.Event | None = None) -> int:
    server = create_server(cfg)  # a bind failure is one line (BindError), before any warning
    if not _is_loopback(cfg.host) and not cfg.auth_token:
        log.warning("binding %s WITHOUT AN AUTH TOKEN: this server is reachable beyond this machine and accepts "
                    "any client; set --auth-token-file or PS_AUTH_TOKEN", cfg.host)
    print(f"{READY_PREFIX}{cfg.host}:{server.port} (shard {cfg.shard_id}/{cfg.num_shards}, mode {cfg.mode})", flush=True)
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        if threading.current_thread() is threading.main_thread():
            signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shard %d: stopping", cfg.shard_id)
    server.stop(grace=2.0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        setup_logging(args.verbose)
        return run(config_from_args(args))

    return run_main("ps-server", body)


if __name__ == "__main__":
    sys.exit(main())
