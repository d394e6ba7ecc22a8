from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("key", "dtype", "shape", "data", "indices")
    KEY_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    key: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    indices: bytes
    def __init__(self, key: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., indices: _Optional[bytes] = ...) -> None: ...

class ParamSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class PlanSpec(_message.Message):
    __slots__ = ("params", "num_shards", "partition_bytes")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    PARTITION_BYTES_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    num_shards: int
    partition_bytes: int
    def __init__(self, params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., num_shards: _Optional[int] = ..., partition_bytes: _Optional[int] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("name", "lr", "momentum", "weight_decay", "beta1", "beta2", "eps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    momentum: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "plan_fingerprint", "clock", "seen_version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    SEEN_VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    plan_fingerprint: str
    clock: int
    seen_version: int
    def __init__(self, worker_id: _Optional[str] = ..., plan_fingerprint: _Optional[str] = ..., clock: _Optional[int] = ..., seen_version: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("initialized", "clock", "version", "mode", "staleness", "num_workers", "worker_timeout", "shard_id", "num_shards", "backup_workers", "transports", "host", "local_socket", "data_port", "server_id")
    INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    WORKER_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_WORKERS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    initialized: bool
    clock: int
    version: int
    mode: str
    staleness: int
    num_workers: int
    worker_timeout: float
    shard_id: int
    num_shards: int
    backup_workers: int
    transports: _containers.RepeatedScalarFieldContainer[str]
    host: str
    local_socket: str
    data_port: int
    server_id: str
    def __init__(self, initialized: _Optional[bool] = ..., clock: _Optional[int] = ..., version: _Optional[int] = ..., mode: _Optional[str] = ..., staleness: _Optional[int] = ..., num_workers: _Optional[int] = ..., worker_timeout: _Optional[float] = ..., shard_id: _Optional[int] = ..., num_shards: _Optional[int] = ..., backup_workers: _Optional[int] = ..., transports: _Optional[_Iterable[str]] = ..., host: _Optional[str] = ..., local_socket: _Optional[str] = ..., data_port: _Optional[int] = ..., server_id: _Optional[str] = ...) -> None: ...

class InitRequest(_message.Message):
    __slots__ = ("worker_id", "plan_fingerprint", "plan", "optimizer", "tensors", "part", "num_parts", "version")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    plan_fingerprint: str
    plan: PlanSpec
    optimizer: OptimizerSpec
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    part: int
    num_parts: int
    version: int
    def __init__(self, worker_id: _Optional[str] = ..., plan_fingerprint: _Optional[str] = ..., plan: _Optional[_Union[PlanSpec, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., part: _Optional[int] = ..., num_parts: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class InitResponse(_message.Message):
    __slots__ = ("applied",)
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    applied: bool
    def __init__(self, applied: _Optional[bool] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("worker_id", "plan_fingerprint", "clock", "keys")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    plan_fingerprint: str
    clock: int
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, worker_id: _Optional[str] = ..., plan_fingerprint: _Optional[str] = ..., clock: _Optional[int] = ..., keys: _Optional[_Iterable[str]] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("tensors", "version", "min_clock")
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MIN_CLOCK_FIELD_NUMBER: _ClassVar[int]
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    version: int
    min_clock: int
    def __init__(self, tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., version: _Optional[int] = ..., min_clock: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("worker_id", "plan_fingerprint", "clock", "base_version", "grads", "part", "num_parts", "no_grad", "member", "members")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    NUM_PARTS_FIELD_NUMBER: _ClassVar[int]
    NO_GRAD_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    plan_fingerprint: str
    clock: int
    base_version: int
    grads: _containers.RepeatedCompositeFieldContainer[Tensor]
    part: int
    num_parts: int
    no_grad: _containers.RepeatedScalarFieldContainer[str]
    member: int
    members: int
    def __init__(self, worker_id: _Optional[str] = ..., plan_fingerprint: _Optional[str] = ..., clock: _Optional[int] = ..., base_version: _Optional[int] = ..., grads: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., part: _Optional[int] = ..., num_parts: _Optional[int] = ..., no_grad: _Optional[_Iterable[str]] = ..., member: _Optional[int] = ..., members: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("outcome", "version", "staleness")
    class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        BUFFERED: _ClassVar[PushResponse.Outcome]
        APPLIED: _ClassVar[PushResponse.Outcome]
        ACCUMULATED: _ClassVar[PushResponse.Outcome]
        DUPLICATE: _ClassVar[PushResponse.Outcome]
        DROPPED: _ClassVar[PushResponse.Outcome]
        EVICTED: _ClassVar[PushResponse.Outcome]
    BUFFERED: PushResponse.Outcome
    APPLIED: PushResponse.Outcome
    ACCUMULATED: PushResponse.Outcome
    DUPLICATE: PushResponse.Outcome
    DROPPED: PushResponse.Outcome
    EVICTED: PushResponse.Outcome
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    outcome: PushResponse.Outcome
    version: int
    staleness: int
    def __init__(self, outcome: _Optional[_Union[PushResponse.Outcome, str]] = ..., version: _Optional[int] = ..., staleness: _Optional[int] = ...) -> None: ...

class PushPullRequest(_message.Message):
    __slots__ = ("push", "pull_keys")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_KEYS_FIELD_NUMBER: _ClassVar[int]
    push: PushRequest
    pull_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, push: _Optional[_Union[PushRequest, _Mapping]] = ..., pull_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class PushPullResponse(_message.Message):
    __slots__ = ("push", "pull")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PULL_FIELD_NUMBER: _ClassVar[int]
    push: PushResponse
    pull: PullResponse
    def __init__(self, push: _Optional[_Union[PushResponse, _Mapping]] = ..., pull: _Optional[_Union[PullResponse, _Mapping]] = ...) -> None: ...

class WorkerRef(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TableSpec(_message.Message):
    __slots__ = ("name", "dim", "optimizer", "lr", "eps", "beta1", "beta2", "initial_accumulator", "init", "init_scale", "seed", "admit_after", "evict_after", "max_rows", "signed_ids")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    INITIAL_ACCUMULATOR_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    INIT_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ADMIT_AFTER_FIELD_NUMBER: _ClassVar[int]
    EVICT_AFTER_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    SIGNED_IDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dim: int
    optimizer: str
    lr: float
    eps: float
    beta1: float
    beta2: float
    initial_accumulator: float
    init: str
    init_scale: float
    seed: int
    admit_after: int
    evict_after: int
    max_rows: int
    signed_ids: bool
    def __init__(self, name: _Optional[str] = ..., dim: _Optional[int] = ..., optimizer: _Optional[str] = ..., lr: _Optional[float] = ..., eps: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., initial_accumulator: _Optional[float] = ..., init: _Optional[str] = ..., init_scale: _Optional[float] = ..., seed: _Optional[int] = ..., admit_after: _Optional[int] = ..., evict_after: _Optional[int] = ..., max_rows: _Optional[int] = ..., signed_ids: _Optional[bool] = ...) -> None: ...

class InitTablesRequest(_message.Message):
    __slots__ = ("worker_id", "tables")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    tables: _containers.RepeatedCompositeFieldContainer[TableSpec]
    def __init__(self, worker_id: _Optional[str] = ..., tables: _Optional[_Iterable[_Union[TableSpec, _Mapping]]] = ...) -> None: ...

class InitTablesResponse(_message.Message):
    __slots__ = ("created", "mode", "staleness", "version")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    created: bool
    mode: str
    staleness: int
    version: int
    def __init__(self, created: _Optional[bool] = ..., mode: _Optional[str] = ..., staleness: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class Rows(_message.Message):
    __slots__ = ("table", "ids", "values", "ids_dtype", "dtype")
    TABLE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    IDS_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    table: str
    ids: bytes
    values: bytes
    ids_dtype: str
    dtype: str
    def __init__(self, table: _Optional[str] = ..., ids: _Optional[bytes] = ..., values: _Optional[bytes] = ..., ids_dtype: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class PullRowsRequest(_message.Message):
    __slots__ = ("worker_id", "clock", "tables")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    clock: int
    tables: _containers.RepeatedCompositeFieldContainer[Rows]
    def __init__(self, worker_id: _Optional[str] = ..., clock: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[Rows, _Mapping]]] = ...) -> None: ...

class PullRowsResponse(_message.Message):
    __slots__ = ("tables", "version")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedCompositeFieldContainer[Rows]
    version: int
    def __init__(self, tables: _Optional[_Iterable[_Union[Rows, _Mapping]]] = ..., version: _Optional[int] = ...) -> None: ...

class PushRowsRequest(_message.Message):
    __slots__ = ("worker_id", "clock", "base_version", "tables")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    CLOCK_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    clock: int
    base_version: int
    tables: _containers.RepeatedCompositeFieldContainer[Rows]
    def __init__(self, worker_id: _Optional[str] = ..., clock: _Optional[int] = ..., base_version: _Optional[int] = ..., tables: _Optional[_Iterable[_Union[Rows, _Mapping]]] = ...) -> None: ...

class TableStats(_message.Message):
    __slots__ = ("rows", "version", "pending", "created", "evicted_idle", "evicted_lru", "admission_dropped", "rows_pulled", "rows_pushed", "pending_forgotten")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EVICTED_IDLE_FIELD_NUMBER: _ClassVar[int]
    EVICTED_LRU_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_DROPPED_FIELD_NUMBER: _ClassVar[int]
    ROWS_PULLED_FIELD_NUMBER: _ClassVar[int]
    ROWS_PUSHED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FORGOTTEN_FIELD_NUMBER: _ClassVar[int]
    rows: int
    version: int
    pending: int
    created: int
    evicted_idle: int
    evicted_lru: int
    admission_dropped: int
    rows_pulled: int
    rows_pushed: int
    pending_forgotten: int
    def __init__(self, rows: _Optional[int] = ..., version: _Optional[int] = ..., pending: _Optional[int] = ..., created: _Optional[int] = ..., evicted_idle: _Optional[int] = ..., evicted_lru: _Optional[int] = ..., admission_dropped: _Optional[int] = ..., rows_pulled: _Optional[int] = ..., rows_pushed: _Optional[int] = ..., pending_forgotten: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("shard_id", "mode", "version", "clocks", "staleness_histogram", "active_workers", "pushes", "pulls", "rejected", "evictions", "dropped", "duplicates", "initialized", "num_keys", "num_elements", "bytes_pushed", "bytes_pulled", "backup_workers", "lost_updates", "checkpoints", "stalled_evictions", "refused_evicted", "overloaded", "reinitialized", "shm_segments", "shm_bytes", "shm_published", "shm_lent_bytes", "tables", "table_mode", "table_version")
    class ClocksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class StalenessHistogramEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class TablesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: TableStats
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[TableStats, _Mapping]] = ...) -> None: ...
    SHARD_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CLOCKS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    INITIALIZED_FIELD_NUMBER: _ClassVar[int]
    NUM_KEYS_FIELD_NUMBER: _ClassVar[int]
    NUM_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PUSHED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PULLED_FIELD_NUMBER: _ClassVar[int]
    BACKUP_WORKERS_FIELD_NUMBER: _ClassVar[int]
    LOST_UPDATES_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    STALLED_EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    REFUSED_EVICTED_FIELD_NUMBER: _ClassVar[int]
    OVERLOADED_FIELD_NUMBER: _ClassVar[int]
    REINITIALIZED_FIELD_NUMBER: _ClassVar[int]
    SHM_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SHM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    SHM_LENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TABLES_FIELD_NUMBER: _ClassVar[int]
    TABLE_MODE_FIELD_NUMBER: _ClassVar[int]
    TABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    shard_id: int
    mode: str
    version: int
    clocks: _containers.ScalarMap[str, int]
    staleness_histogram: _containers.ScalarMap[int, int]
    active_workers: int
    pushes: int
    pulls: int
    rejected: int
    evictions: int
    dropped: int
    duplicates: int
    initialized: bool
    num_keys: int
    num_elements: int
    bytes_pushed: int
    bytes_pulled: int
    backup_workers: int
    lost_updates: int
    checkpoints: int
    stalled_evictions: int
    refused_evicted: int
    overloaded: int
    reinitialized: int
    shm_segments: int
    shm_bytes: int
    shm_published: int
    shm_lent_bytes: int
    tables: _containers.MessageMap[str, TableStats]
    table_mode: str
    table_version: int
    def __init__(self, shard_id: _Optional[int] = ..., mode: _Optional[str] = ..., version: _Optional[int] = ..., clocks: _Optional[_Mapping[str, int]] = ..., staleness_histogram: _Optional[_Mapping[int, int]] = ..., active_workers: _Optional[int] = ..., pushes: _Optional[int] = ..., pulls: _Optional[int] = ..., rejected: _Optional[int] = ..., evictions: _Optional[int] = ..., dropped: _Optional[int] = ..., duplicates: _Optional[int] = ..., initialized: _Optional[bool] = ..., num_keys: _Optional[int] = ..., num_elements: _Optional[int] = ..., bytes_pushed: _Optional[int] = ..., bytes_pulled: _Optional[int] = ..., backup_workers: _Optional[int] = ..., lost_updates: _Optional[int] = ..., checkpoints: _Optional[int] = ..., stalled_evictions: _Optional[int] = ..., refused_evicted: _Optional[int] = ..., overloaded: _Optional[int] = ..., reinitialized: _Optional[int] = ..., shm_segments: _Optional[int] = ..., shm_bytes: _Optional[int] = ..., shm_published: _Optional[int] = ..., shm_lent_bytes: _Optional[int] = ..., tables: _Optional[_Mapping[str, TableStats]] = ..., table_mode: _Optional[str] = ..., table_version: _Optional[int] = ...) -> None: ...
