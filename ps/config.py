"""Configuration: frozen dataclasses validated once, and the wire limits set in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ps import compress, tls
from ps.errors import InvalidArgument

MiB = 1 << 20

# The default size above which a tensor is split into slices, and the target size of one request.
DEFAULT_PARTITION_BYTES = 4 * MiB
# The largest gRPC message either side accepts. Requests are batched well below it.
MAX_MESSAGE_BYTES = 64 * MiB
# Room left in a message for keys, shapes and framing around the tensor bytes.
MESSAGE_HEADROOM_BYTES = 1 * MiB

MODES = ("sync", "async", "ssp")
TRANSPORTS = ("auto", "unary", "stream", "tcp", "shm")  # how a worker's calls travel (ps.worker.transport)
OPTIMIZERS = ("sgd", "momentum", "adam")


def grpc_options() -> list[tuple[str, int]]:
    """Channel and server options shared by both ends (message limits live here only).
    Keepalive pings every 10 s (answered within 5 s) find a connection that died silently (a
    network partition that drops packets), so a waiting pull (whose deadline may be long) fails over to a
    retry instead of waiting forever; servers accept pings that often."""
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)


def checkpoint_interval(spec: str) -> tuple[float, int]:
    """(seconds, 0) for "30s", (0, steps) for "500"; InvalidArgument names the rule."""
    s = spec.strip()
    try:
        value = float(s[:-1]) if s.endswith("s") else int(s)
    except ValueError:
        value = 0
    if not (math.isfinite(value) and value > 0):
        raise InvalidArgument(f"checkpoint_every ({spec!r}) must be seconds like '30s' or a number of updates like '500'")
    return (float(value), 0) if s.endswith("s") else (0.0, int(value))


def check_partition_bytes(partition_bytes: int) -> None:
    """Slices must fit in one message with room to spare."""
    limit = MAX_MESSAGE_BYTES - MESSAGE_HEADROOM_BYTES
    _check(
        1024 <= partition_bytes <= limit,
        f"partition_bytes ({partition_bytes}) must be between 1024 and {limit}",
    )


@dataclass(frozen=True)
class OptimizerConfig:
    """The server-side optimizer; its semantics are those of torch.optim.SGD / Adam."""

    name: str = "momentum"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, f"optimizer ({self.name!r}) must be one of {OPTIMIZERS}")
        _check(math.isfinite(self.lr) and self.lr > 0, f"lr ({self.lr}) must be a finite number > 0")
        _check(0 <= self.momentum < 1, f"momentum ({self.momentum}) must be in [0, 1)")
        _check(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"weight_decay ({self.weight_decay}) must be >= 0",
        )
        _check(0 <= self.beta1 < 1, f"beta1 ({self.beta1}) must be in [0, 1)")
        _check(0 <= self.beta2 < 1, f"beta2 ({self.beta2}) must be in [0, 1)")
        _check(self.eps > 0, f"eps ({self.eps}) must be > 0")


@dataclass(frozen=True)
class ServerConfig:
    """Everything one ps-server shard needs."""

    host: str = "127.0.0.1"
    port: int = 0
    shard_id: int = 0
    num_shards: int = 1
    mode: str = "sync"
    staleness: int = 0
    num_workers: int = 1
    worker_timeout: float = 30.0
    staleness_lr: bool = False
    backup_workers: int = 0
    progress_timeout: float = 120.0  # sync, ssp: evict a worker a waiting step is blocked on after this long (0: never)
    max_inflight_bytes: int = 1 << 30  # bytes of requests being processed at once; beyond: wait, then refuse
    threads: int = 8  # threads for the tensor work of large requests (the event loop serves the rest)
    auth_token: str = field(default="", repr=False)  # "": no authentication
    checkpoint_dir: str = ""       # "": no checkpoints
    checkpoint_every: str = "60s"  # "Ns": every N seconds; "N": every N versions (applied updates)
    restore: bool = False          # resume from the newest usable checkpoint in checkpoint_dir
    restore_if_present: bool = False  # the same, but start fresh when there is no checkpoint yet
    metrics_port: int = -1         # Prometheus endpoint: -1 off, 0 a free port
    tls_cert: str = ""             # PEM paths: cert + key serve TLS; + ca: clients must present a cert (mTLS)
    tls_key: str = ""
    tls_ca: str = ""
    shm: bool = True               # offer shared memory to workers on this host (ps.shm)
    data_port: int = 0             # the TCP data port for workers elsewhere (ps.tcp): 0 a free one, -1 none
    table_mode: str = ""           # embedding tables' mode: sync, async, ssp ("": the dense mode)
    table_staleness: int = -1      # the tables' ssp bound (-1: staleness)
    checkpoint_chunk_bytes: int = 64 * MiB  # a table's checkpoint is written and read in chunks of about this size

    def __post_init__(self) -> None:
        _check(0 <= self.port <= 65535, f"port ({self.port}) must be in [0, 65535]")
        _check(self.num_shards >= 1, f"num_shards ({self.num_shards}) must be >= 1")
        _check(
            0 <= self.shard_id < self.num_shards,
            f"shard_id ({self.shard_id}) must be in [0, num_shards={self.num_shards})",
        )
        _check(self.mode in MODES, f"mode ({self.mode!r}) must be one of {MODES}")
        _check(self.staleness >= 0, f"staleness ({self.staleness}) must be >= 0")
        _check(self.num_workers >= 1, f"num_workers ({self.num_workers}) must be >= 1")
        _check(self.worker_timeout > 0, f"worker_timeout ({self.worker_timeout}) must be > 0")
        _check(
            0 <= self.backup_workers < self.num_workers,
            f"backup_workers ({self.backup_workers}) must be in [0, num_workers={self.num_workers})",
        )
        _check(self.backup_workers == 0 or self.mode == "sync",
               f"backup_workers ({self.backup_workers}) applies to sync mode only, not {self.mode!r}")
        _check(self.threads >= 1, f"threads ({self.threads}) must be >= 1")
        _check(math.isfinite(self.progress_timeout) and self.progress_timeout >= 0,
               f"progress_timeout ({self.progress_timeout}) must be >= 0 seconds (0: never)")
        _check(self.max_inflight_bytes >= MiB, f"max_inflight_bytes ({self.max_inflight_bytes}) must be >= {MiB}")
        checkpoint_interval(self.checkpoint_every)
        tls.check(self.tls_cert, self.tls_key, self.tls_ca, server=True)
        _check(-1 <= self.metrics_port <= 65535, f"metrics_port ({self.metrics_port}) must be -1 (off) or in [0, 65535]")
        _check(-1 <= self.data_port <= 65535, f"data_port ({self.data_port}) must be -1 (none) or in [0, 65535]")
        _check(self.data_port <= 0 or self.data_port != self.port,
               f"data_port ({self.data_port}) must differ from port ({self.port})")
        _check(self.table_mode in ("", *MODES), f"table_mode ({self.table_mode!r}) must be one of {MODES} (or empty: mode)")
        _check(self.table_staleness >= -1, f"table_staleness ({self.table_staleness}) must be >= 0 (or -1: staleness)")
        _check(self.checkpoint_chunk_bytes >= MiB,
               f"checkpoint_chunk_bytes ({self.checkpoint_chunk_bytes}) must be >= {MiB}")
        _check(not (self.restore or self.restore_if_present) or bool(self.checkpoint_dir),
               "restore needs a checkpoint_dir to restore from")


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one ps-worker needs."""

    servers: tuple[str, ...] = ()
    worker_id: str = ""
    rank: int = 0
    num_workers: int = 1
    model: str = "mlp"
    data: str = "digits"
    batch_size: int = 32
    steps: int = 0
    epochs: float = 0.0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    device: str = "auto"
    seed: int = 0
    log_dir: str = ""
    eval_every: int = 50
    partition_bytes: int = DEFAULT_PARTITION_BYTES
    progress: bool = True
    connect_timeout: float = 60.0
    retry_timeout: float = 300.0  # how long calls retry a server that is down (restarting) before failing
    compress: str = "none"  # gradients on the wire: none, fp16, bf16, topk:R (see ps.compress)
    transport: str = "auto"  # auto, unary, stream, tcp, shm (see ps.worker.transport)
    tp: int = 1             # tensor-parallel ranks in this worker's group
    micro_batches: int = 1  # gradient accumulation over this many micro-batches per step
    recompute: bool = False  # activation recomputation (models that support it)
    push_early: bool = False  # push each gradient as backward produces it (overlaps the push with backward)
    prefetch: bool = False    # async/ssp: pull the next step's weights while computing this one
    loader_workers: int = 0   # DataLoader worker processes preparing batches (0: on the training thread)
    straggler: float = 1.0  # fault injection: this worker's steps take this many times longer
    kill_at: int = -1       # fault injection: SIGKILL this worker when it reaches this step (-1: never)
    auth_token: str = field(default="", repr=False)  # sent with every RPC when the servers require one
    tls_ca: str = ""    # PEM paths: the CA that signed the servers' certificates (TLS) ...
    tls_cert: str = ""  # ... and this worker's certificate and key (mutual TLS)
    tls_key: str = ""

    def __post_init__(self) -> None:
        _check(len(self.servers) >= 1, "servers must name at least one host:port")
        for server in self.servers:
            host, _, port = server.rpartition(":")
            _check(bool(host) and port.isdigit(), f"server address ({server!r}) must be host:port")
        _check(self.num_workers >= 1, f"num_workers ({self.num_workers}) must be >= 1")
        _check(0 <= self.rank < self.num_workers, f"rank ({self.rank}) must be in [0, {self.num_workers})")
        _check(self.batch_size >= 1, f"batch_size ({self.batch_size}) must be >= 1")
        _check(self.steps >= 0, f"steps ({self.steps}) must be >= 0")
        _check(self.epochs >= 0, f"epochs ({self.epochs}) must be >= 0")
        _check(self.steps > 0 or self.epochs > 0, "one of steps or epochs must be > 0")
        _check(self.device in ("auto", "cpu", "cuda"), f"device ({self.device!r}) must be auto, cpu or cuda")
        _check(self.eval_every >= 0, f"eval_every ({self.eval_every}) must be >= 0")
        _check(self.connect_timeout > 0, f"connect_timeout ({self.connect_timeout}) must be > 0")
        _check(self.retry_timeout > 0, f"retry_timeout ({self.retry_timeout}) must be > 0")
        check_partition_bytes(self.partition_bytes)
        compress.parse(self.compress)
        _check(self.transport in TRANSPORTS, f"transport ({self.transport!r}) must be one of {', '.join(TRANSPORTS)}")
        tls.check(self.tls_cert, self.tls_key, self.tls_ca, server=False)
        _check(self.tp >= 1, f"tp ({self.tp}) must be >= 1")
        _check(self.loader_workers >= 0, f"loader_workers ({self.loader_workers}) must be >= 0")
        _check(self.micro_batches >= 1 and self.batch_size % self.micro_batches == 0,
               f"micro_batches ({self.micro_batches}) must be >= 1 and divide batch_size ({self.batch_size})")
        _check(math.isfinite(self.straggler) and self.straggler >= 1, f"straggler ({self.straggler}) must be >= 1")
        _check(self.kill_at >= -1, f"kill_at ({self.kill_at}) must be a step >= 0, or -1 for never")
