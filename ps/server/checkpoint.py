"""Shard checkpoints: tensors in safetensors, everything else in a JSON manifest; no pickle.

A checkpoint of shard k at version v is two files in the checkpoint directory:
  shard-k-v000000000123.safetensors   parameters (`param/<key>`), optimizer state (`opt/<key>/<name>`)
                                      and a sync step's partial sums (`acc/<key>`)
  shard-k-v000000000123.json          the manifest: plan, optimizer, mode, version, worker clocks,
                                      counters, and the SHA-256 of the tensor file
  shard-k-v000000000123-N-t0-r0.safetensors ... server-held embedding tables (ps.server.table), in chunks
                                      of about checkpoint_chunk_bytes: table j's rows (-tj-rI: ids, values,
                                      optimizer state, last update), admission counts (-tj-pI) and a sync
                                      step's partial sums (-tj-acc); each chunk's SHA-256 in the manifest;
                                      N a random name per save
Each file is written to a temporary name, flushed to disk and renamed; the manifest is renamed
last, so a checkpoint exists only once it is complete. A save again at a version on disk (at
stop, or when only the tables moved) writes its dense file as shard-k-vV-N.safetensors: the
files the manifest on disk names are never touched, and those no manifest names go once the
new one is in place. The newest KEEP checkpoints are kept. Loading
checks the digest before parsing, so a truncated or corrupted file is reported by name, renamed
aside (`*.json.corrupt`, `*.safetensors.corrupt`: kept for inspection, never counted or pruned
as a checkpoint) and the next older checkpoint is used instead. A checkpoint that is intact but
does not fit the server (another shard, mode or format) is reported and left as it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ps.config import OptimizerConfig
from ps.errors import PSError
from ps.server.table import SavedTables, Table, TableSet
from ps.sharding import ParamSpec, Plan, make_plan
from ps.tables import TableSpec

log = logging.getLogger("ps.server")
FORMAT = 1
KEEP = 2


class CheckpointError(PSError):
    """No usable checkpoint (or one that does not fit this server)."""

    code = "FAILED_PRECONDITION"


class DamagedCheckpoint(CheckpointError):
    """A checkpoint's files are truncated, corrupted, missing or unparseable."""


QUARANTINE_SUFFIX = ".corrupt"


@dataclass
class Snapshot:
    """Everything a shard needs to resume, taken under its lock."""

    shard_id: int
    num_shards: int
    mode: str
    plan: Plan
    optimizer: OptimizerConfig
    version: int
    clocks: dict[str, int]
    staleness_histogram: dict[int, int]
    counters: dict[str, int]
    params: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, torch.Tensor]]
    active: list[str] = field(default_factory=list)  # workers holding a lease at the snapshot
    accumulated: dict[str, torch.Tensor] = field(default_factory=dict)  # the sync step's partial sums
    accumulated_counts: dict[str, int] = field(default_factory=dict)
    step_pushes: int = 0
    tables: SavedTables | None = None  # read back from a checkpoint (saving reads the live tables)


def _name(shard_id: int, version: int) -> str:
    return f"shard-{shard_id}-v{version:012d}"


def _write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_chunk(base: str, suffix: str, tensors: dict[str, torch.Tensor]) -> dict:
    blob = st_save({k: v.contiguous() for k, v in tensors.items()})
    path = f"{base}-{suffix}.safetensors"
    _write(path, blob)
    return {"file": os.path.basename(path), "sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}


def _save_tables(base: str, tables: TableSet, chunk_bytes: int) -> dict:
    """Write the tables chunk by chunk, holding them still meanwhile (their requests wait; the
    memory taken is one chunk's); the manifest's section for them. The files of one attempt
    carry a name of their own: a save again at the same version (at stop, say) never touches
    the files the manifest on disk names until its own manifest replaces it."""
    base = f"{base}-{secrets.token_hex(4)}"
    with tables.frozen() as (state, acc):
        out = {**state, "tables": []}
        for j, (name, table) in enumerate(tables.tables.items()):
            rows = max(1, chunk_bytes // table.row_bytes())
            entry = {"spec": asdict(table.spec), "version": table.version, "counters": dict(table.counters),
                     "rows": [], "pending": [], "acc": None}
            for i, chunk in enumerate(table.export_rows(rows)):
                entry["rows"].append({**_save_chunk(base, f"t{j}-r{i}", chunk), "count": len(chunk["ids"])})
            for i, chunk in enumerate(table.export_pending(max(1, chunk_bytes // 24))):
                entry["pending"].append({**_save_chunk(base, f"t{j}-p{i}", chunk), "count": len(chunk["ids"])})
            if name in acc:
                entry["acc"] = _save_chunk(base, f"t{j}-acc", acc[name])
            out["tables"].append(entry)
        return out


def _data_files(directory: str, base_name: str) -> list[str]:
    """The tensor files of the checkpoint named `base_name` (shard-k-vV): its dense file (plain,
    or named per save) and its tables' chunks, of every save at that version."""
    pattern = re.compile(rf"^{re.escape(base_name)}(-[0-9a-f]{{8}}(-t\d+-(r\d+|p\d+|acc))?)?\.safetensors$")
    try:
        return [os.path.join(directory, n) for n in os.listdir(directory) if pattern.match(n)]
    except FileNotFoundError:
        return []


def save(directory: str, snap: Snapshot, tables: TableSet | None = None, chunk_bytes: int = 64 << 20) -> str:
    """Write `snap` (and the live `tables`, chunk by chunk) atomically; returns the manifest's
    path. Older checkpoints beyond KEEP go."""
    os.makedirs(directory, exist_ok=True)
    tensors = {f"param/{k}": v.contiguous() for k, v in snap.params.items()}
    for key, state in snap.optimizer_state.items():
        tensors.update({f"opt/{key}/{name}": t.contiguous() for name, t in state.items()})
    tensors.update({f"acc/{k}": g.contiguous() for k, g in snap.accumulated.items()})
    blob = st_save(tensors)
    base = os.path.join(directory, _name(snap.shard_id, snap.version))
    # A save again at a version on disk (at stop; or the tables moved, not the dense version)
    # writes files of its own: the checkpoint on disk stays whole until the manifest replaces it.
    tensor_path = base + ".safetensors"
    if os.path.exists(tensor_path):
        tensor_path = f"{base}-{secrets.token_hex(4)}.safetensors"
    table_section = _save_tables(base, tables, chunk_bytes) if tables is not None and tables.tables else None
    manifest = {
        "format": FORMAT, "shard_id": snap.shard_id, "num_shards": snap.num_shards, "mode": snap.mode,
        "version": snap.version, "clocks": snap.clocks,
        "staleness_histogram": {str(k): v for k, v in snap.staleness_histogram.items()},
        "counters": snap.counters, "optimizer": asdict(snap.optimizer), "active": snap.active,
        "accumulated_counts": snap.accumulated_counts, "step_pushes": snap.step_pushes,
        "plan": {"params": [[p.name, list(p.shape), p.dtype] for p in snap.plan.params],
                 "num_shards": snap.plan.num_shards, "partition_bytes": snap.plan.partition_bytes,
                 "fingerprint": snap.plan.fingerprint},
        "tensors": os.path.basename(tensor_path), "sha256": hashlib.sha256(blob).hexdigest(),
        "bytes": len(blob), "tables": table_section,
    }
    _write(tensor_path, blob)
    _write(base + ".json", json.dumps(manifest, indent=1, sort_keys=True).encode())
    _sync_dir(directory)
    named = {c["file"] for t in (table_section or {}).get("tables", ()) for c in
             [*t["rows"], *t["pending"], *([t["acc"]] if t["acc"] else [])]} | {os.path.basename(tensor_path)}
    for stale in _data_files(directory, os.path.basename(base)):  # an earlier save at this version
        if os.path.basename(stale) not in named:
            os.remove(stale)
    for old in [c for c in candidates(directory, snap.shard_id) if c != base + ".json"][KEEP - 1:]:
        old_base = old[:-len(".json")]
        for path in [old_base + ".json", *_data_files(directory, os.path.basename(old_base))]:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
    return base + ".json"


def candidates(directory: str, shard_id: int) -> list[str]:
    """Manifests of this shard, newest first."""
    pattern = re.compile(rf"^shard-{shard_id}-v(\d{{12}})\.json$")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = sorted(((int(m.group(1)), n) for n in names if (m := pattern.match(n))), reverse=True)
    return [os.path.join(directory, n) for _, n in found]


def _load_one(manifest_path: str, shard_id: int, num_shards: int, mode: str, table_mode: str) -> Snapshot:
    try:
        with open(manifest_path, "rb") as f:
            m = json.loads(f.read())
        if m.get("format") != FORMAT:
            raise CheckpointError(f"format {m.get('format')!r} is not {FORMAT}")
        if (m["shard_id"], m["num_shards"], m["mode"]) != (shard_id, num_shards, mode):
            raise CheckpointError(
                f"it holds shard {m['shard_id']}/{m['num_shards']} in mode {m['mode']!r}, but this server is "
                f"shard {shard_id}/{num_shards} in mode {mode!r}")
        tensor_path = os.path.join(os.path.dirname(manifest_path), os.path.basename(m["tensors"]))
        with open(tensor_path, "rb") as f:
            blob = f.read()
        if len(blob) != m["bytes"] or hashlib.sha256(blob).hexdigest() != m["sha256"]:
            raise DamagedCheckpoint(f"{os.path.basename(tensor_path)} is truncated or corrupted "
                                  f"({len(blob)} bytes, {m['bytes']} expected, digest mismatch)")
        tensors = st_load(blob)
        p = m["plan"]
        plan = make_plan([ParamSpec(n, tuple(s), d) for n, s, d in p["params"]], p["num_shards"], p["partition_bytes"])
        if plan.fingerprint != p["fingerprint"]:
            raise DamagedCheckpoint("its plan does not reproduce its fingerprint")
        params, opt_state, acc = {}, {}, {}
        for name, t in tensors.items():
            kind, _, rest = name.partition("/")
            if kind == "param":
                params[rest] = t
            elif kind == "opt":
                key, _, state_name = rest.rpartition("/")
                opt_state.setdefault(key, {})[state_name] = t
            elif kind == "acc":
                acc[rest] = t
        expected = {s.key for s in plan.slices_for(shard_id)}
        if set(params) != expected:
            raise DamagedCheckpoint(f"it holds {len(params)} slices, not this shard's {len(expected)}")
        saved_tables = None
        if m.get("tables"):
            if m["tables"]["mode"] != table_mode:
                raise CheckpointError(f"its tables were trained in mode {m['tables']['mode']!r}, but this server's "
                                      f"table mode is {table_mode!r}")
            saved_tables = _load_tables(os.path.dirname(manifest_path), m["tables"])
        counts = {str(k): int(v) for k, v in m.get("accumulated_counts", {}).items()}
        if not set(opt_state) <= expected or not set(acc) <= set(counts) <= expected:
            raise DamagedCheckpoint("its optimizer state or partial sums name slices this shard does not hold")
        return Snapshot(
            shard_id, num_shards, mode, plan, OptimizerConfig(**m["optimizer"]), int(m["version"]),
            {str(k): int(v) for k, v in m["clocks"].items()},
            {int(k): int(v) for k, v in m["staleness_histogram"].items()},
            {str(k): int(v) for k, v in m["counters"].items()}, params, opt_state,
            [str(w) for w in m.get("active", [])], acc, counts, int(m.get("step_pushes", 0)), saved_tables)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, PSError) as e:  # unreadable, bad JSON or safetensors
        raise DamagedCheckpoint(f"{type(e).__name__}: {e}") from None


def _load_chunk(directory: str, entry: dict) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, os.path.basename(entry["file"]))
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) != entry["bytes"] or hashlib.sha256(blob).hexdigest() != entry["sha256"]:
        raise DamagedCheckpoint(f"{os.path.basename(path)} is truncated or corrupted "
                                f"({len(blob)} bytes, {entry['bytes']} expected, digest mismatch)")
    return st_load(blob)


def _load_tables(directory: str, section: dict) -> SavedTables:
    """The tables of a checkpoint, read a chunk at a time (each checked against its digest)."""
    tables = {}
    for entry in section["tables"]:
        table = Table(TableSpec(**entry["spec"]))
        for chunk in entry["rows"]:
            tensors = _load_chunk(directory, chunk)
            if len(tensors.get("ids", ())) != chunk["count"]:
                raise DamagedCheckpoint(f"{chunk['file']} holds another number of rows than its manifest says")
            table.load_rows(tensors)
        for chunk in entry["pending"]:
            table.load_pending(_load_chunk(directory, chunk))
        table.version = int(entry["version"])
        table.counters.update({str(k): int(v) for k, v in entry["counters"].items()})
        table.reindex()
        tables[table.spec.name] = table
    acc = {e["spec"]["name"]: _load_chunk(directory, e["acc"]) for e in section["tables"] if e.get("acc")}
    steps = {str(k) for k in section["step_pushes"]}
    for tensors in acc.values():
        if any(key.partition("/")[2] not in steps or key.partition("/")[0] not in ("ids", "grads", "seen") for key in tensors):
            raise DamagedCheckpoint("a table's partial sums name a step the manifest does not list")
    return SavedTables(tables, int(section["version"]), {str(k): int(v) for k, v in section["clocks"].items()},
                       {int(k): int(v) for k, v in section["step_pushes"].items()},
                       {str(k): int(v) for k, v in section["counters"].items()},
                       {int(k): int(v) for k, v in section["staleness_histogram"].items()}, acc)


def quarantine(manifest_path: str) -> None:
    """Rename a damaged checkpoint's files aside, so that they are neither loaded again nor
    counted among the checkpoints kept (which would prune a good one in their place)."""
    base = manifest_path[:-len(".json")]
    for path in (manifest_path, *_data_files(os.path.dirname(manifest_path), os.path.basename(base))):
        if not os.path.exists(path):
            continue
        try:
            os.replace(path, path + QUARANTINE_SUFFIX)
        except OSError as e:
            log.error("checkpoint file %s could not be renamed aside: %s", path, e.strerror)
        else:
            log.warning("checkpoint file %s renamed to %s", path, os.path.basename(path) + QUARANTINE_SUFFIX)


def load_latest(directory: str, shard_id: int, num_shards: int, mode: str, table_mode: str = "") -> Snapshot:
    """The newest checkpoint of this shard that loads; each one that does not is reported, and
    a damaged one is quarantined."""
    errors = []
    for path in candidates(directory, shard_id):
        try:
            snap = _load_one(path, shard_id, num_shards, mode, table_mode or mode)
        except CheckpointError as e:
            log.error("checkpoint %s is unusable: %s; trying the previous one", path, e)
            errors.append(f"{os.path.basename(path)}: {e}")
            if isinstance(e, DamagedCheckpoint):
                quarantine(path)
            continue
        return snap
    if not errors:
        raise CheckpointError(f"no checkpoint of shard {shard_id} in {directory!r} to restore")
    raise CheckpointError(f"no usable checkpoint of shard {shard_id} in {directory!r}: " + "; ".join(errors))
