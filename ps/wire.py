"""The tensor-carrying messages (PushRequest, PullResponse, PushPullRequest, PushPullResponse)
written and read without protobuf touching the tensor bytes.

The bytes on the wire are exactly the messages of proto/ps/proto/ps.proto: protobuf's encoding is
a sequence of (tag, value) fields, and a message written as several pieces joined together is the
message with all their fields. So the small fields go through protobuf as usual, and each
tensor's `data` (and `indices`) field is written here as a tag, a length and the tensor's own
memory, all joined into the outgoing bytes in one copy. Reading walks the fields of the received
bytes, hands everything but the tensor payloads to protobuf, and returns the payloads as
read-only memoryviews of the received bytes (no copy). Messages up to SMALL bytes are parsed
by protobuf whole instead (it copies their payloads, which costs less than walking the fields
in Python) into the same structures. Any other client speaking the .proto
interoperates; the generated stubs work against a ps-server unchanged.

A reader never raises on hostile bytes: it returns `Malformed`, which the servicer answers with
INVALID_ARGUMENT (a deserializer that raised would give INTERNAL). It reads what protobuf's parser
reads from the same bytes and refuses what it refuses: copies of a singular message field are
merged, unknown fields (groups too, and known numbers with another wire type) are skipped, tags and
lengths take at most 5 bytes, nesting at most MAX_DEPTH levels; tests/unit/test_wire.py compares
the two. Its one refusal of its own is a message of more than _MAX_FIELDS fields.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from ps.errors import PSError, error_from_wire
from ps.proto import ps_pb2 as pb

_LEN = 2  # wire type of length-delimited fields
# Field numbers in ps.proto.
_TENSOR_DATA, _TENSOR_INDICES = 4, 5
_PUSH_GRADS = 5
_PULL_TENSORS = 1
_PUSHPULL_PUSH, _PUSHPULL_PULL = 1, 2
_ROWS_IDS, _ROWS_VALUES = 2, 3  # ps.Rows
_PULLROWS_TABLES, _PUSHROWS_TABLES = 1, 4  # PullRowsResponse.tables, PushRowsRequest.tables
_MAX_FIELDS = 1 << 20  # a message with more fields than this is hostile
MAX_DEPTH = 100  # protobuf's nesting limit: messages and groups below the outermost message


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, length: int) -> bytes:
    return varint(number << 3 | _LEN) + varint(length)


@dataclass
class Frame:
    """An outgoing message as pieces (bytes or buffers) that are joined once, when sent (on a
    socket, sent as they are). `head`: for a split frame (ps.link), the bytes of its head."""

    chunks: list = field(default_factory=list)
    size: int = 0
    head: int = 0

    @classmethod
    def of(cls, *chunks) -> Frame:
        f = cls()
        for c in chunks:
            f.add(c)
        return f

    def add(self, chunk) -> None:
        self.chunks.append(chunk)
        self.size += memoryview(chunk).nbytes

    def add_message(self, number: int, inner: Frame) -> None:
        """`inner` as field `number` of this message."""
        self.add(_len_field(number, inner.size))
        self.chunks += inner.chunks
        self.size += inner.size

    def tobytes(self) -> bytes:
        if len(self.chunks) == 1 and isinstance(self.chunks[0], bytes):
            return self.chunks[0]
        return b"".join(self.chunks)


def tensor_frame(key: str, dtype: str, shape, data, indices=None) -> Frame:
    """A Tensor message; `data` and `indices` are buffers (memoryview, numpy array, bytes)."""
    f = Frame()
    f.add(pb.Tensor(key=key, dtype=dtype, shape=list(shape)).SerializeToString())
    for number, payload in ((_TENSOR_DATA, data), (_TENSOR_INDICES, indices)):
        if payload is not None:
            view = memoryview(payload).cast("B")
            if view.nbytes:
                f.add(_len_field(number, view.nbytes))
                f.add(view)
    return f


def push_frame(header: pb.PushRequest, tensors: list[Frame]) -> Frame:
    """A PushRequest: `header`'s fields (no grads) and the tensors as its `grads`."""
    f = Frame()
    f.add(header.SerializeToString())
    for t in tensors:
        f.add_message(_PUSH_GRADS, t)
    return f


def pull_response_frame(version: int, min_clock: int, tensors: list[Frame]) -> Frame:
    f = Frame()
    f.add(pb.PullResponse(version=version, min_clock=min_clock).SerializeToString())
    for t in tensors:
        f.add_message(_PULL_TENSORS, t)
    return f


def rows_frame(table: str, ids=None, values=None) -> Frame:
    """A Rows message; `ids` (int64) and `values` (float32) are buffers, sent as they are."""
    f = Frame.of(pb.Rows(table=table).SerializeToString())
    for number, data in ((_ROWS_IDS, ids), (_ROWS_VALUES, values)):
        if data is not None and memoryview(data).nbytes:
            f.add(_len_field(number, memoryview(data).nbytes))
            f.add(data)
    return f


def rows_message_frame(head, rows: list[Frame]) -> Frame:
    """A PullRowsResponse or PushRowsRequest: `head` (its other fields), then its Rows (field 1
    of the answer, 4 of the request)."""
    f = Frame.of(head.SerializeToString())
    number = _PULLROWS_TABLES if isinstance(head, pb.PullRowsResponse) else _PUSHROWS_TABLES
    for r in rows:
        f.add_message(number, r)
    return f


def push_pull_request_frame(push: Frame, pull_keys: list[str]) -> Frame:
    f = Frame()
    f.add_message(_PUSHPULL_PUSH, push)
    f.add(pb.PushPullRequest(pull_keys=pull_keys).SerializeToString())
    return f


def push_pull_response_frame(push: pb.PushResponse, pull: Frame) -> Frame:
    f = Frame()
    f.add(pb.PushPullResponse(push=push).SerializeToString())
    f.add_message(_PUSHPULL_PULL, pull)
    return f


def serialize(message) -> bytes:
    """gRPC serializer for a Frame or a protobuf message."""
    return message.tobytes() if isinstance(message, Frame) else message.SerializeToString()


# -- reading ---------------------------------------------------------------------------------------

class _Bad(Exception):
    pass


@dataclass(frozen=True)
class Malformed:
    """What a reader returns for bytes that are not a valid message."""

    reason: str


@dataclass
class WireTensor:
    """A received Tensor whose payloads are read-only views of the received bytes."""

    key: str
    dtype: str
    shape: tuple
    data: memoryview
    indices: memoryview


@dataclass
class PushIn:
    """A received PushRequest: its scalar fields in `header`, its grads as WireTensors."""

    header: pb.PushRequest
    grads: list[WireTensor]


@dataclass
class PullIn:
    header: pb.PullResponse
    tensors: list[WireTensor]
    done: Callable[[], object] | None = None  # answered by reference: call once its tensors were read


@dataclass
class PushPullIn:
    push: PushIn
    pull_keys: list[str]


@dataclass
class PushPullOut:
    push: pb.PushResponse
    pull: PullIn


def _read_varint(buf: memoryview, pos: int, end: int, most: int = 10) -> tuple[int, int]:
    """A varint of at most `most` bytes (protobuf takes 10 for values, 5 for tags and lengths)."""
    value = shift = 0
    for _ in range(most):
        if pos >= end:
            break
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
    raise _Bad("truncated or overlong varint")


def _tag(buf: memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """(field number, wire type, position after the tag); tags are 32-bit, as in protobuf."""
    tag, pos = _read_varint(buf, pos, end, most=5)
    if tag >> 32:
        raise _Bad("tag does not fit in 32 bits")
    return tag >> 3, tag & 7, pos


def _skip_group(buf: memoryview, pos: int, end: int, number: int, depth: int) -> int:
    """Skip the fields of a group opened by field `number` (a deprecated encoding protobuf still
    accepts as an unknown field) up to its end tag; returns the position after it. Each group
    nests one level deeper, under protobuf's limit of MAX_DEPTH levels."""
    if depth > MAX_DEPTH:
        raise _Bad(f"nested deeper than {MAX_DEPTH} levels")
    while pos < end:
        inner, wire_type, pos = _tag(buf, pos, end)
        if wire_type == 4:
            if inner != number:
                raise _Bad(f"group {number} ended by field {inner}")
            return pos
        pos = _skip(buf, pos, end, inner, wire_type, depth)
    raise _Bad(f"group {number} is not ended")


def _skip(buf: memoryview, pos: int, end: int, number: int, wire_type: int, depth: int) -> int:
    """The position after the value of a field whose tag ends at `pos`."""
    if wire_type == 0:
        return _read_varint(buf, pos, end)[1]
    if wire_type == 1 or wire_type == 5:
        pos += 8 if wire_type == 1 else 4
        if pos > end:
            raise _Bad("truncated fixed-width field")
        return pos
    if wire_type == _LEN:
        length, pos = _read_varint(buf, pos, end, most=5)
        if length > end - pos:
            raise _Bad(f"field {number} declares {length} bytes but {end - pos} remain")
        return pos + length
    if wire_type == 3:
        return _skip_group(buf, pos, end, number, depth + 1)
    raise _Bad(f"unexpected wire type {wire_type}")


def _fields(buf: memoryview, start: int, end: int, depth: int):
    """(number, wire type, field start, value start, end) of each field of a message nested
    `depth` levels deep; a LEN field's value is its bytes, without the length."""
    pos, n = start, 0
    while pos < end:
        n += 1
        if n > _MAX_FIELDS:
            raise _Bad("too many fields")
        field_start = pos
        number, wire_type, pos = _tag(buf, pos, end)
        if number == 0:
            raise _Bad("field number 0")
        if wire_type == _LEN:  # the common case first: _skip would read the length again
            length, value_start = _read_varint(buf, pos, end, most=5)
            if length > end - value_start:
                raise _Bad(f"field {number} declares {length} bytes but {end - value_start} remain")
            pos = value_start + length
        else:
            value_start, pos = pos, _skip(buf, pos, end, number, wire_type, depth)
        yield number, wire_type, field_start, value_start, pos


def _split(buf: memoryview, start: int, end: int, wanted: set[int], cls, depth: int):
    """Parse everything but the LEN fields numbered in `wanted` with protobuf (`cls`); return
    (message, [(number, start, end) of the wanted fields in order]). A wanted number with another
    wire type is an unknown field to protobuf, so it goes to protobuf with the rest."""
    rest, picked, run_start = [], [], start
    for number, wire_type, field_start, s, e in _fields(buf, start, end, depth):
        if number in wanted and wire_type == _LEN:
            rest.append(buf[run_start:field_start])  # the other fields since the last wanted one
            picked.append((number, s, e))
            run_start = e
    rest.append(buf[run_start:end])
    return cls.FromString(b"".join(rest)), picked


def _tensor(buf: memoryview, start: int, end: int, depth: int) -> WireTensor:
    header, picked = _split(buf, start, end, {_TENSOR_DATA, _TENSOR_INDICES}, pb.Tensor, depth)
    payload = {_TENSOR_DATA: buf[0:0], _TENSOR_INDICES: buf[0:0]}
    for number, s, e in picked:  # the last occurrence wins, as in protobuf
        payload[number] = buf[s:e]
    return WireTensor(header.key, header.dtype, tuple(header.shape), payload[_TENSOR_DATA], payload[_TENSOR_INDICES])


def _push(buf: memoryview, start: int, end: int, depth: int = 0) -> PushIn:
    header, picked = _split(buf, start, end, {_PUSH_GRADS}, pb.PushRequest, depth)
    return PushIn(header, [_tensor(buf, s, e, depth + 1) for _, s, e in picked])


def _pull(buf: memoryview, start: int, end: int, depth: int = 0) -> PullIn:
    header, picked = _split(buf, start, end, {_PULL_TENSORS}, pb.PullResponse, depth)
    return PullIn(header, [_tensor(buf, s, e, depth + 1) for _, s, e in picked])


def _nested(buf: memoryview, start: int, end: int, number: int, cls, read, depth: int):
    """A message whose (singular) message field `number` is read with `read` and the rest with
    protobuf. An absent field reads as empty. Several occurrences are merged, as protobuf does:
    the field reads as the concatenation of their bytes (later scalars win, repeated fields
    append); its payloads are then views of that copy."""
    header, picked = _split(buf, start, end, {number}, cls, depth)
    if len(picked) > 1:
        joined = memoryview(b"".join(buf[s:e] for _, s, e in picked))
        return header, read(joined, 0, len(joined), depth + 1)
    s, e = picked[0][1:] if picked else (0, 0)
    return header, read(buf, s, e, depth + 1)


def _reader(read, small=None):
    """A gRPC deserializer: `read` walks the fields in Python so that payloads stay views of the
    received bytes; messages up to SMALL bytes go to `small` (protobuf's parser, then the same
    structures: walking the fields costs more than copying a few kilobytes)."""

    def deserialize(data: bytes):
        buf = memoryview(data)
        try:
            if small is not None and len(buf) <= SMALL:
                return small(data)
            return read(buf, 0, len(buf))
        except (_Bad, DecodeError, ValueError, RecursionError) as e:
            return Malformed(f"malformed message ({len(data)} bytes): {e}")

    return deserialize


def _protobuf_reader(cls):
    """cls.FromString, but Malformed instead of an exception (which gRPC would answer INTERNAL)."""
    return _reader(lambda buf, start, end: cls.FromString(buf[start:end].tobytes()))


def _wire_tensor(t: pb.Tensor) -> WireTensor:
    return WireTensor(t.key, t.dtype, tuple(t.shape), memoryview(t.data), memoryview(t.indices))


def _small_push(m: pb.PushRequest) -> PushIn:
    tensors = [_wire_tensor(t) for t in m.grads]
    m.ClearField("grads")
    return PushIn(m, tensors)


def _small_pull(m: pb.PullResponse) -> PullIn:
    tensors = [_wire_tensor(t) for t in m.tensors]
    m.ClearField("tensors")
    return PullIn(m, tensors)


def _small_push_pull_request(data: bytes) -> PushPullIn:
    m = pb.PushPullRequest.FromString(data)
    return PushPullIn(_small_push(m.push), list(m.pull_keys))


def _small_push_pull_response(data: bytes) -> PushPullOut:
    m = pb.PushPullResponse.FromString(data)
    return PushPullOut(m.push, _small_pull(m.pull))


def _push_pull_request(buf: memoryview, start: int, end: int) -> PushPullIn:
    header, push = _nested(buf, start, end, _PUSHPULL_PUSH, pb.PushPullRequest, _push, 0)
    return PushPullIn(push, list(header.pull_keys))


def _push_pull_response(buf: memoryview, start: int, end: int) -> PushPullOut:
    header, pull = _nested(buf, start, end, _PUSHPULL_PULL, pb.PushPullResponse, _pull, 0)
    return PushPullOut(header.push, pull)


SMALL = 16 << 10
read_push = _reader(_push, lambda data: _small_push(pb.PushRequest.FromString(data)))
read_pull_response = _reader(_pull, lambda data: _small_pull(pb.PullResponse.FromString(data)))
read_push_pull_request = _reader(_push_pull_request, _small_push_pull_request)
read_push_pull_response = _reader(_push_pull_response, _small_push_pull_response)
# The field walkers alone, whatever the size (tests read every message both ways).
WALKERS = {name: _reader(read) for name, read in (("push", _push), ("pull_response", _pull),
                                                  ("push_pull_request", _push_pull_request),
                                                  ("push_pull_response", _push_pull_response))}


# -- gRPC plumbing ---------------------------------------------------------------------------------

SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name  # "ps.ParameterServer"
# Methods whose tensor-carrying side is written or read here: (request reader, response reader).
_FAST = {
    "Push": (read_push, pb.PushResponse.FromString),
    "Pull": (_protobuf_reader(pb.PullRequest), read_pull_response),
    "PushPull": (read_push_pull_request, read_push_pull_response),
}


def _methods():
    for m in pb.DESCRIPTOR.services_by_name["ParameterServer"].methods:  # as declared in ps.proto
        yield m.name, getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)


class Stub:
    """Client stub of the ParameterServer service: every method takes a protobuf message or a
    Frame; Pull and PushPull answer PullIn / PushPullOut (tensor payloads as memoryviews)."""

    def __init__(self, channel):
        for name, _, _ in _methods():
            setattr(self, name, channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=serialize,
                                                    response_deserializer=response_reader(name)))
        self.Stream = channel.stream_stream(f"/{SERVICE}/{STREAM_METHOD}")  # raw bytes both ways


def request_reader(name: str):
    """The server's reader of method `name`'s request (bytes in; a message, or Malformed)."""
    return _FAST[name][0] if name in _FAST else _protobuf_reader(_REQUEST[name])


def response_reader(name: str):
    """The client's reader of method `name`'s answer."""
    if name in _FAST:
        return _FAST[name][1]
    cls = _RESPONSE[name]
    return lambda data: cls.FromString(bytes(data))


_REQUEST = {name: req for name, req, _ in _methods()}
_RESPONSE = {name: resp for name, _, resp in _methods()}


def handler(servicer) -> grpc.GenericRpcHandler:
    """The service's handler for a gRPC server: Push and PushPull requests arrive as PushIn /
    PushPullIn (or Malformed); every method may answer a Frame or a protobuf message. Beside the
    unary methods, `Stream` carries any of them multiplexed on one bidirectional stream of raw
    bytes (see the stream framing below)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=request_reader(name), response_serializer=serialize)
        for name, _, _ in _methods()
    }
    handlers[STREAM_METHOD] = grpc.stream_stream_rpc_method_handler(servicer.Stream)  # raw bytes both ways
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


# -- the stream path -------------------------------------------------------------------------------
# One bidirectional gRPC stream per worker and shard (method `Stream`, raw bytes, no protobuf
# around the frames) carries the unary methods' own messages, so one call's setup (HTTP/2
# headers, metadata, the auth check) serves every request and answers need no new stream.
#   request: u8 method code (0: cancel request `id`), u32 id, then the method's request bytes
#   answer:  u32 id, u8 status (0: OK, then the method's answer bytes; else the gRPC status code's
#            value, then UTF-8 "ErrorClass\0details")
# Requests are served concurrently; answers come back as they complete, tagged by id. A request
# cancelled while the server was serving it is answered CANCELLED once its work has ended.
# With a shared-memory segment (transport "shm", see ps.shm), set up by a SEGMENT request:
#   SEGMENT request: u16 name length, the segment's name, the worker's 16-byte nonce, worker id;
#            answered OK with the server's nonce
#   a method code | SHM: then u64 request offset, u64 request length (0: the request bytes follow
#            here, inline), u64 answer offset, u64 answer capacity (0: none reserved)
#   answer status SHM: the answer lies at the reserved offset; then its u64 length
# On a plain socket (ps.link), a Pull may ask for its answer as a split frame (flag RAW), so that
# the tensors' bytes are received straight into the worker's tensors:
#   answer status RAW: a PullResponse whose tensors carry key, dtype and shape but no data (the
#            frame's head); the tensors' bytes follow, in that order (its tail)
# With a segment, a Pull with flags SHM and RAW may be answered with where the slices lie in the
# server's published memory (ps.shm.Arena), which the worker maps read-only and copies from:
#   answer status REF: u64 lease, u32 length of a PullResponse without payloads (as RAW's head),
#            that PullResponse, u16 number of chunks, per chunk u16 name length, its name ("PID:FD"),
#            u64 size and u64 tag (in its header), then per tensor u16 chunk index and u64 offset
#   RELEASE request (id 0): u64 leases whose slices the worker has read; never answered

STREAM_METHOD = "Stream"
CANCEL = 0
SEGMENT = 0x7F
RELEASE = 0x7E
SHM = 0x80
RAW = 0x40
STREAM_CODES = {name: i + 1 for i, (name, _, _) in enumerate(_methods())}
STREAM_NAMES = {code: name for name, code in STREAM_CODES.items()}
_STATUS = {s.value[0]: s for s in grpc.StatusCode}
_REQ_HEAD = struct.Struct("<BI")
_ANS_HEAD = struct.Struct("<IB")
ANSWER_HEAD = _ANS_HEAD.size
_SHM_DESC = struct.Struct("<QQQQ")
_SHM_LEN = struct.Struct("<Q")
IN_SHM = "shm"  # read_stream_answer's status for an answer written into the reserved area
IN_RAW = "raw"  # read_stream_answer's status for a split answer (its body: the PullResponse's head)
IN_REF = "ref"  # read_stream_answer's status for an answer by reference (read_ref_answer)
_RAW_STATUS = 0x81
_REF_STATUS = 0x82
_REF_HEAD = struct.Struct("<QI")
_REF_AT = struct.Struct("<HQ")
MAX_RELEASE = 1 << 16  # leases one RELEASE may name


@dataclass(frozen=True)
class StreamRequest:
    code: int  # a method's code, CANCEL or SEGMENT
    rid: int
    body: memoryview  # the request bytes sent inline (or the SEGMENT offer)
    shm: tuple[int, int, int, int] | None = None  # (request offset, length, answer offset, capacity)
    raw: bool = False  # a Pull whose answer may come as a split frame (with `shm`: by reference)


def stream_request(name: str, rid: int, message, shm: tuple[int, int, int, int] | None = None,
                   raw: bool = False) -> Frame:
    """A stream request for method `name` ("": cancel `rid`); with `shm`, its descriptor, and
    `message` inline only when the descriptor's request length is 0; `raw`: its answer may come
    as a split frame (a Pull, on a plain socket)."""
    code = (STREAM_CODES[name] | (RAW if raw else 0)) if name else CANCEL
    if shm is not None:
        head = _REQ_HEAD.pack(code | SHM, rid) + _SHM_DESC.pack(*shm)
        if shm[1]:
            return Frame.of(head)
    else:
        head = _REQ_HEAD.pack(code, rid)
    if message is None:
        return Frame.of(head)
    if isinstance(message, Frame):
        return Frame(chunks=[head, *message.chunks], size=len(head) + message.size)
    return Frame.of(head, message.SerializeToString())


def segment_offer(rid: int, name: str, nonce: bytes, worker_id: str) -> bytes:
    n = name.encode()
    return _REQ_HEAD.pack(SEGMENT, rid) + struct.pack("<H", len(n)) + n + bytes(nonce) + worker_id.encode()


def read_segment_offer(body: memoryview) -> tuple[str, bytes, str]:
    """(name, nonce, worker id) of a SEGMENT request's body; ValueError if it is not one."""
    if len(body) < 2:
        raise ValueError("a segment offer is shorter than its 2-byte name length")
    (n,) = struct.unpack_from("<H", body)
    if len(body) < 2 + n + 16:
        raise ValueError(f"a segment offer of {len(body)} bytes cannot hold a {n}-byte name and a 16-byte nonce")
    raw = bytes(body)
    return raw[2:2 + n].decode("ascii", "replace"), raw[2 + n:2 + n + 16], raw[2 + n + 16:].decode("utf-8", "replace")


def read_stream_request(data: bytes) -> StreamRequest:
    """A stream request's parts; ValueError if it is not one."""
    if len(data) < _REQ_HEAD.size:
        raise ValueError(f"a stream request of {len(data)} bytes is shorter than its {_REQ_HEAD.size}-byte header")
    raw, rid = _REQ_HEAD.unpack_from(data)
    code, body, split = raw & ~(SHM | RAW), memoryview(data)[_REQ_HEAD.size:], bool(raw & RAW)
    if raw in (SEGMENT, RELEASE):
        return StreamRequest(raw, rid, body)
    if (code not in STREAM_NAMES and raw != CANCEL) or (split and code != STREAM_CODES["Pull"]):
        raise ValueError(f"stream request {rid} names method code {raw}, which is none of {sorted(STREAM_NAMES)} "
                         f"(with or without the shared-memory flag {SHM}; Pull's also with the split-answer flag "
                         f"{RAW}), {CANCEL} (cancel), {SEGMENT} (segment) or {RELEASE} (release)")
    if not raw & SHM:
        return StreamRequest(code, rid, body, raw=split)
    if len(body) < _SHM_DESC.size:
        raise ValueError(f"stream request {rid} has the shared-memory flag but {len(body)} bytes, not the "
                         f"{_SHM_DESC.size}-byte descriptor")
    desc = _SHM_DESC.unpack_from(body)
    if desc[1] and len(body) > _SHM_DESC.size:
        raise ValueError(f"stream request {rid} places its request in shared memory and also sends "
                         f"{len(body) - _SHM_DESC.size} bytes inline")
    return StreamRequest(code, rid, body[_SHM_DESC.size:], desc, raw=split)


def stream_answer(rid: int, message) -> Frame:
    """An OK answer: its pieces as they are (joined where it is sent, if at all)."""
    body = message_bytes(message)
    return Frame(chunks=[_ANS_HEAD.pack(rid, 0), *body.chunks], size=_ANS_HEAD.size + body.size)


def stream_raw_answer(rid: int, meta: bytes, payload: list) -> Frame:
    """A split answer: its head, this answer's header and `meta` (a PullResponse without
    payloads); its tail, the buffers of `payload` (the tensors' bytes, in meta's order)."""
    head = _ANS_HEAD.pack(rid, _RAW_STATUS) + meta
    return Frame(chunks=[head, *payload], size=len(head) + sum(memoryview(p).nbytes for p in payload),
                 head=len(head))


def raw_pull(meta, tail: list) -> PullIn | Malformed:
    """A split Pull answer: its tensors' data are views of `tail` (the buffers its bytes were
    received into, one per tensor when they were routed, else one for all)."""
    try:
        header = pb.PullResponse.FromString(bytes(meta))
    except DecodeError as e:
        return Malformed(f"malformed split answer: {e}")
    views, at, off, tensors = [memoryview(t).cast("B") for t in tail], 0, 0, []
    for t in header.tensors:
        n = 4 * math.prod(t.shape)
        if t.dtype != "float32" or len(t.data) or len(t.indices) or len(t.shape) > 8 or any(d < 0 for d in t.shape):
            return Malformed(f"split answer tensor {t.key!r} is not a dense float32 tensor without payload "
                             f"({t.dtype} {list(t.shape)[:9]})")
        while at < len(views) and off == len(views[at]):
            at, off = at + 1, 0
        if at < len(views) and len(views[at]) - off >= n:
            data, off = views[at][off:off + n], off + n
        else:  # spread over several buffers (not as routed): joined
            parts, need = [], n
            while need and at < len(views):
                take = min(need, len(views[at]) - off)
                parts.append(views[at][off:off + take])
                need, off = need - take, off + take
                if off == len(views[at]):
                    at, off = at + 1, 0
            if need:
                return Malformed(f"split answer tensors need more bytes than its {sum(map(len, views))}")
            data = memoryview(b"".join(parts))
        tensors.append(WireTensor(t.key, t.dtype, tuple(t.shape), data, memoryview(b"")))
    total = sum(map(len, views))
    if sum(len(t.data) for t in tensors) != total:
        return Malformed(f"split answer of {total} bytes has bytes its tensors do not account for")
    header.ClearField("tensors")
    return PullIn(header, tensors)


def stream_ref_answer(rid: int, lease: int, meta: bytes, chunks: list[tuple[str, int, int]],
                      refs: list[tuple[int, int]]) -> Frame:
    """An answer by reference: `meta` (a PullResponse without payloads), the arena chunks it
    names (name, size, tag) and, per tensor in meta's order, (chunk index, offset) of its bytes."""
    parts = [_ANS_HEAD.pack(rid, _REF_STATUS), _REF_HEAD.pack(lease, len(meta)), meta, struct.pack("<H", len(chunks))]
    for name, size, tag in chunks:
        n = name.encode()
        parts.append(struct.pack("<H", len(n)) + n + struct.pack("<QQ", size, tag))
    parts += [_REF_AT.pack(i, off) for i, off in refs]
    return Frame.of(b"".join(parts))


def read_ref_answer(body: memoryview) -> tuple[int, pb.PullResponse, list[tuple[str, int, int]],
                                               list[tuple[int, int]]]:
    """(lease, the PullResponse without payloads, chunks, per tensor (chunk, offset)) of an answer
    by reference; ValueError if it is not one."""
    try:
        lease, n = _REF_HEAD.unpack_from(body)
        pos = _REF_HEAD.size
        if pos + n > len(body):
            raise ValueError("its head runs past its end")
        header = pb.PullResponse.FromString(bytes(body[pos:pos + n]))
        pos += n
        (count,), pos = struct.unpack_from("<H", body, pos), pos + 2
        chunks = []
        for _ in range(count):
            (k,), pos = struct.unpack_from("<H", body, pos), pos + 2
            name = bytes(body[pos:pos + k]).decode("ascii")
            (size, tag), pos = struct.unpack_from("<QQ", body, pos + k), pos + k + 16
            chunks.append((name, size, tag))
        refs = [_REF_AT.unpack_from(body, pos + i * _REF_AT.size) for i in range(len(header.tensors))]
        if pos + len(refs) * _REF_AT.size != len(body) or any(i >= count for i, _ in refs):
            raise ValueError("its references do not match its tensors and chunks")
    except (struct.error, DecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed answer by reference: {e}") from None
    return lease, header, chunks, refs


def stream_release(leases: list[int]) -> bytes:
    return _REQ_HEAD.pack(RELEASE, 0) + struct.pack(f"<{len(leases)}Q", *leases)


def read_release(body: memoryview) -> list[int]:
    """The leases a RELEASE names; ValueError if it is not one."""
    if len(body) % 8 or len(body) > 8 * MAX_RELEASE:
        raise ValueError(f"a release of {len(body)} bytes is not a list of at most {MAX_RELEASE} u64 leases")
    return list(struct.unpack(f"<{len(body) // 8}Q", body))


def stream_shm_answer(rid: int, nbytes: int) -> Frame:
    return Frame.of(_ANS_HEAD.pack(rid, SHM) + _SHM_LEN.pack(nbytes))


def stream_error(rid: int, code: grpc.StatusCode, error_class: str, details: str) -> Frame:
    return Frame.of(_ANS_HEAD.pack(rid, code.value[0]) + f"{error_class}\0{details}".encode())


def stream_failure(rid: int, e: BaseException) -> Frame:
    """The answer to a request that failed with `e`: its status and class for a PSError, else
    INTERNAL (a bug)."""
    if isinstance(e, PSError):
        return stream_error(rid, getattr(grpc.StatusCode, e.code), type(e).__name__, str(e))
    return stream_error(rid, grpc.StatusCode.INTERNAL, "", f"{type(e).__name__}: {e}")


def read_stream_failure(status: grpc.StatusCode, body) -> PSError:
    """The PSError a failed stream answer (status, "ErrorClass\0details") stands for."""
    error_class, _, details = bytes(body).decode("utf-8", "replace").partition("\0")
    return error_from_wire(status.name, error_class or None, details)


def read_stream_answer(data: bytes) -> tuple[int, grpc.StatusCode | str | None, memoryview]:
    """(id, None and the answer bytes | IN_SHM and its u64 length | the status code and
    "ErrorClass\0details")."""
    rid, status = _ANS_HEAD.unpack_from(data)
    body = memoryview(data)[_ANS_HEAD.size:]
    if status == SHM:
        return rid, IN_SHM, body
    if status == _RAW_STATUS:
        return rid, IN_RAW, body
    if status == _REF_STATUS:
        return rid, IN_REF, body
    return rid, (None if status == 0 else _STATUS.get(status, grpc.StatusCode.UNKNOWN)), body


def shm_answer_length(body: memoryview) -> int:
    return _SHM_LEN.unpack_from(body)[0]


def message_bytes(message) -> Frame:
    """A message as a Frame (its chunks written once, wherever it goes)."""
    return message if isinstance(message, Frame) else Frame.of(message.SerializeToString())


def read_body(reader, body: memoryview):
    """A method's reader on part of a stream message (small messages as bytes, for protobuf)."""
    return reader(body.tobytes() if len(body) <= SMALL else body)
