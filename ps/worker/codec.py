"""Push and pull encoding for the client: requests batched by size, push parts laid out per
shard, pull answers decoded straight into place (and checked to cover what was asked)."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ps import wire
from ps.config import MiB
from ps.compress import Compressor
from ps.errors import InvalidArgument, Unavailable
from ps.proto import ps_pb2 as pb
from ps.serde import dense_frame, sparse_frame, tensor_into
from ps.sharding import Plan, Slice

Job = tuple[int, int, list[Slice], int]  # (shard, part, slices, num_parts) of one push request


def batches(slices: Sequence[Slice], limit: int, nbytes: Callable[[Slice], int] = lambda s: 4 * s.length
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


# Requests through shared memory group slices up to this many bytes (their bytes pass no socket
# there, and each request costs its own handling on both sides: 25 requests a round for a 100 MiB
# model took the servers twice the CPU time of 2); under the message limit, should one fall back
# to a socket.
WIDE_BYTES = 56 * MiB


def answer_bytes(batch: Sequence[Slice]) -> int:
    """About how many bytes a pull answer for these slices takes (fp32 payloads, framing)."""
    return 64 + sum(4 * s.length + 32 + len(s.key) for s in batch)


# Which part's outcome stands for a shard's push: what happened to the push outranks a part
# answered DUPLICATE (parts re-sent after the one that completed it) or BUFFERED.
_RANK = {"BUFFERED": 0, "DUPLICATE": 1, "DROPPED": 2, "ACCUMULATED": 2, "APPLIED": 2, "EVICTED": 3}


def push_results(responses: Iterable[tuple[int, pb.PushResponse]]) -> list[dict]:
    """One result per shard: the outcome of the part that decided its push."""
    final: dict[int, dict] = {}
    for shard, resp in responses:
        outcome = pb.PushResponse.Outcome.Name(resp.outcome)
        if shard not in final or _RANK[outcome] >= _RANK[final[shard]["outcome"]]:
            final[shard] = {"outcome": outcome, "version": resp.version, "staleness": resp.staleness}
    return [final[k] for k in sorted(final)]


class Codec:
    """What a push or pull of this plan looks like on the wire; layouts are computed once."""

    def __init__(self, plan: Plan, num_servers: int, partition_bytes: int, compressor: Compressor,
                 member: tuple[int, int] = (0, 1)):
        self.plan, self.num_servers, self.partition_bytes, self.comp = plan, num_servers, partition_bytes, compressor
        self.member = member  # (index, count) of the processes that push as one worker
        self.pull_batches = [batches(plan.slices_for(k), partition_bytes) for k in range(num_servers)]
        self._subset_batches: dict[frozenset, list[list[list[Slice]]]] = {}
        self._layouts: dict[tuple, list[Job]] = {}

    def shard_bytes(self, shard: int) -> int:
        """What the largest push or pull of every slice of `shard` takes on the wire (fp32, framing):
        the size of each of a shared-memory segment's two regions."""
        return sum(answer_bytes(b) + 4096 for b in self.pull_batches[shard]) + (1 << 16)

    def limit(self, shard: int, wide: frozenset[int]) -> int:
        """The most bytes one request to `shard` groups: WIDE_BYTES for the shards in `wide`
        (those reached through shared memory), else the partition size."""
        return max(self.partition_bytes, WIDE_BYTES) if shard in wide else self.partition_bytes

    def batches_for(self, names: Sequence[str] | None, wide: frozenset[int] = frozenset()) -> list[list[list[Slice]]]:
        """Per shard, the pull requests for these parameters (all when None); shards in `wide`
        in requests of up to WIDE_BYTES."""
        if names is None and not wide:
            return self.pull_batches
        key = (None if names is None else frozenset(names), wide)
        if key not in self._subset_batches:
            self._subset_batches[key] = [
                batches([s for s in self.plan.slices_for(k) if names is None or s.name in key[0]], self.limit(k, wide))
                for k in range(self.num_servers)]
        return self._subset_batches[key]

    def dtypes(self, grads: Mapping[str, torch.Tensor | None]) -> dict[str, torch.dtype]:
        """The dtype each gradient travels from (the parameter's own for one that has none)."""
        unknown = [n for n in grads if n not in self.plan.specs]
        if unknown:
            raise InvalidArgument(f"gradient {unknown[0]!r} names no parameter of the plan "
                                  f"(expected one of {sorted(self.plan.specs)[:5]})")
        return {n: g.dtype if g is not None else getattr(torch, self.plan.specs[n].dtype) for n, g in grads.items()}

    def layout(self, dtypes: Mapping[str, torch.dtype], wide: frozenset[int] = frozenset()) -> list[Job]:
        """How a push of these tensors (name: dtype) splits into requests (to the shards in
        `wide` in requests of up to WIDE_BYTES). It depends on the names and dtypes only, not on
        the values: computed once per set."""
        key = (tuple(dtypes.items()), wide)
        if key not in self._layouts:
            size = {n: self.comp.wire_dtype(d).itemsize for n, d in dtypes.items()}
            nbytes = lambda s: self.comp.wire_bytes(s.length, size[s.name])  # noqa: E731
            jobs: list[Job] = []
            for k in range(self.num_servers):
                bs = batches([s for s in self.plan.slices_for(k) if s.name in size], self.limit(k, wide), nbytes)
                jobs += [(k, i, b, len(bs)) for i, b in enumerate(bs)]
            self._layouts[key] = jobs
        return self._layouts[key]

    def split(self, grads: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        """Wire tensors by slice key (none for a parameter whose gradient is None): on the CPU, each
        slice in the dtype it travels in (no copy where it already is)."""
        names = [n for n, g in grads.items() if g is not None]
        flat = self.plan.split({n: grads[n].detach().to("cpu") for n in names}, names)
        return {k: self.comp.to_wire(t) for k, t in flat.items()}

    def push_request(self, worker_id: str, clock: int, base_version: int, job: Job,
                     flat: Mapping[str, torch.Tensor]) -> wire.Frame:
        """One part of a push, from `flat` (wire tensors by slice key; read when the request is
        serialised). Slices of the part missing from `flat` travel as keys without a gradient."""
        shard, part, batch, num_parts = job
        given = [s for s in batch if s.key in flat]
        header = pb.PushRequest(worker_id=worker_id, plan_fingerprint=self.plan.fingerprint, clock=clock,
                                base_version=base_version, part=part, num_parts=num_parts,
                                no_grad=[s.key for s in batch if s.key not in flat],
                                member=self.member[0], members=self.member[1] if self.member[1] > 1 else 0)
        if self.comp.sparse:
            tensors = [sparse_frame(s.key, [s.length], *self.comp.sparsify(s.key, flat[s.key])) for s in given]
        else:
            tensors = [dense_frame(s.key, flat[s.key]) for s in given]
        return wire.push_frame(header, tensors)


def _decodable(t: torch.Tensor | None, shape: tuple[int, ...]) -> bool:
    return (t is not None and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
            and tuple(t.shape) == tuple(shape))


class Mirrors:
    """Pinned host tensors, one per parameter, reused by every pull into CUDA tensors: slices are
    decoded into them and copied to the device as they arrive (non_blocking), on a copy stream
    of the client's own per device."""

    def __init__(self):
        self._held: dict[str, torch.Tensor] = {}
        self._streams: dict[torch.device, "torch.cuda.Stream"] = {}

    def get(self, name: str, shape) -> torch.Tensor:
        t = self._held.get(name)
        if t is None or tuple(t.shape) != tuple(shape):
            t = self._held[name] = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        return t

    def stream(self, device: torch.device) -> "torch.cuda.Stream":
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def prepare(self, into: Mapping[str, torch.Tensor] | None) -> dict:
        """On the caller's thread, before a pull into `into`: per CUDA device, the copy stream,
        once it has finished any earlier pull's copies (the mirrors are written again) and made
        to wait for what the caller's current stream has queued (its kernels may still read
        those tensors)."""
        ready = {}
        for device in {t.device for t in (into or {}).values() if t.device.type == "cuda"}:
            stream = self.stream(device)
            stream.synchronize()
            stream.wait_stream(torch.cuda.current_stream(device))
            ready[device] = stream
        return ready


def _landed(data: memoryview, host: torch.Tensor) -> bool:
    """Whether `data` is `host`'s own memory (its bytes were received into place)."""
    return len(data) == host.numel() * 4 and np.frombuffer(data, np.uint8).ctypes.data == host.data_ptr()


def _on_cuda(t: torch.Tensor | None, shape: tuple[int, ...]) -> bool:
    return (t is not None and t.device.type == "cuda" and t.dtype == torch.float32 and t.is_contiguous()
            and tuple(t.shape) == tuple(shape))


class Lapsed(Unavailable):
    """An answer by reference was read after its stream ended: pull it again."""


class Pulled:
    """The destination of one pull: tensors to decode into, versions seen per shard. Answers are
    absorbed on the client's event loop (one at a time). Fp32 CUDA tensors in `into` (with
    `mirrors`) get each slice as its answer arrives: decoded into the pinned mirror, copied to
    the device without waiting; `finish` waits for those copies."""

    def __init__(self, plan: Plan, servers: Sequence[str], names: Sequence[str] | None,
                 into: Mapping[str, torch.Tensor] | None, mirrors: Mirrors | None = None, streams: dict | None = None):
        wanted = plan.specs if names is None else {n: plan.specs[n] for n in names}
        self.plan, self.servers, self.given = plan, servers, dict(into or {})
        # `streams`: Mirrors.prepare(into), made on the caller's thread (CUDA's current stream is per thread).
        self.streams = streams or {}
        self.to_device = {n for n, spec in wanted.items() if _on_cuda(self.given.get(n), spec.shape)
                          and self.given[n].device in self.streams}
        self.out = {n: self.given[n] if _decodable(self.given.get(n), spec.shape)
                    else mirrors.get(n, spec.shape) if n in self.to_device
                    else torch.empty(spec.shape, dtype=torch.float32) for n, spec in wanted.items()}
        self.expected = {s.key for n in wanted for s in plan.slices_of(n)}
        self.received: set[str] = set()
        self.versions: dict[int, int] = {}
        self.min_clocks: dict[int, int] = {}

    def absorb(self, shard: int, resp: wire.PullIn | wire.Malformed) -> None:
        """Decode one answer straight into place."""
        if isinstance(resp, wire.Malformed):
            raise InvalidArgument(f"server {self.servers[shard]} sent a {resp.reason}")
        try:
            self._absorb(shard, resp)
        finally:  # its tensors were the server's published slices: read now
            intact = resp.done() if resp.done is not None else True
        if intact is False:
            self.received -= {t.key for t in resp.tensors}
            raise Lapsed(f"server {self.servers[shard]}: the stream its answer came on ended before it was read, "
                         "and what it named may have been let go; read again")
        self.versions[shard] = min(self.versions.get(shard, resp.header.version), resp.header.version)
        self.min_clocks[shard] = resp.header.min_clock

    def _absorb(self, shard: int, resp: wire.PullIn) -> None:
        for t in resp.tensors:
            s = self.plan.by_key.get(t.key)
            if s is None or s.name not in self.out or t.key in self.received:
                raise InvalidArgument(f"server {self.servers[shard]} sent key {t.key!r}, which was not asked for "
                                      "(or sent it twice)")
            host = self.out[s.name].view(-1)[s.start : s.start + s.length]
            if not _landed(t.data, host):  # (a split answer may have been received right there)
                tensor_into(t, host)
            if s.name in self.to_device:
                dest = self.given[s.name].detach()  # a model's parameter itself may be given
                with torch.cuda.stream(self.streams[dest.device]):
                    dest.view(-1)[s.start : s.start + s.length].copy_(host, non_blocking=True)
            self.received.add(t.key)

    def place(self, keys: Sequence[str]) -> Callable[[pb.PullResponse], list | None]:
        """For the pull of `keys`: given its answer's tensors (key, dtype, shape), the buffers
        their bytes go straight into (where `absorb` would decode them), or None when the answer
        is not what was asked (absorb then says why)."""
        asked = set(keys)

        def place(meta: pb.PullResponse) -> list | None:
            out = []
            for t in meta.tensors:
                s = self.plan.by_key.get(t.key)
                if (s is None or t.key not in asked or s.name not in self.out or t.key in self.received
                        or t.dtype != "float32" or list(t.shape) != [s.length]):
                    return None
                host = self.out[s.name].detach().view(-1)[s.start : s.start + s.length]
                out.append(memoryview(host.numpy()).cast("B"))
            return out

        return place

    def drain(self) -> None:
        """Wait for the copies to the device: the tensors hold the values absorbed so far, and the
        mirrors may be written again (by this pull's finish, or by another pull)."""
        for stream in self.streams.values():
            stream.synchronize()

    def finish(self) -> dict[str, torch.Tensor]:
        """Check that every slice asked for arrived, copy into `into` where not decoded there."""
        missing = self.expected - self.received
        if missing:
            raise InvalidArgument(f"the servers' answers lack {len(missing)} slices asked for, e.g. "
                                  f"{sorted(missing)[:3]}: the weights were not installed (tensors given as `into` "
                                  "that answers decode into directly may hold some of the new values, to the byte)")
        with torch.no_grad():
            self.drain()
            for n, t in self.given.items():
                if n in self.out and self.out[n] is not t and n not in self.to_device:
                    t.copy_(self.out[n])
        return {n: self.given[n] if n in self.to_device else t for n, t in self.out.items()}
