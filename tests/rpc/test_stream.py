"""The stream path (every method multiplexed on one bidirectional gRPC stream of raw bytes, or
on the local socket of a co-located server): negotiated at Register, same answers and error
codes as unary calls, garbage refused with a specific status while the stream goes on, auth
checked when the stream opens."""

import asyncio
import socket
import struct

import grpc
import pytest
import torch

from ps import link, wire
from ps.config import OptimizerConfig, ServerConfig
from ps.errors import InvalidArgument, UnknownKey
from ps.proto import ps_pb2 as pb
from ps.server.app import create_server
from ps.server.auth import bearer
from ps.worker.client import PSClient
from ps.worker.transport import Transport
from tests.streams import VIAS, exchange, frame, raw_socket, read_all, read_frame

SGD1 = OptimizerConfig("sgd", lr=1.0)


@pytest.fixture
def server():
    srv = create_server(ServerConfig(mode="async", auth_token="tok"))
    yield srv
    srv.stop(grace=0)


def test_auto_takes_the_fastest_path_a_server_offers_and_unary_stays_unary(server):
    for transport, path in (("auto", "shm"), ("stream", "stream"), ("unary", "unary")):  # shm: on this host
        with PSClient([server.address], f"w-{transport}", auth_token="tok", transport=transport) as c:
            clock = c.setup({"w": torch.zeros(4)}, SGD1)
            assert c._t.path(0) == path
            assert c.push({"w": torch.ones(4)}, clock)[0]["outcome"] == "APPLIED"
            with pytest.raises(UnknownKey):  # the same error class and message on both paths
                c._t.run(c._t.call(0, "Pull", pb.PullRequest(worker_id=c.worker_id, plan_fingerprint=c.plan.fingerprint,
                                                             clock=1, keys=["nope#0"])))


def test_a_server_without_the_stream_is_refused_when_stream_is_asked_for_and_auto_falls_back():
    t = Transport(["127.0.0.1:1"], transport="stream")
    try:
        with pytest.raises(InvalidArgument, match="offers only"):
            t.negotiate(0, ["unary"])
    finally:
        t.close()
    t = Transport(["127.0.0.1:1"], transport="auto")
    try:
        t.negotiate(0, [])
        assert t.path(0) == "unary"
    finally:
        t.close()
    with pytest.raises(InvalidArgument, match="transport"):
        Transport(["127.0.0.1:1"], transport="quic")


@pytest.mark.parametrize("via", VIAS)
def test_garbage_on_the_stream_gets_invalid_argument_changes_nothing_and_the_stream_goes_on(server, via):
    with PSClient([server.address], "good", auth_token="tok") as c:
        c.setup({"w": torch.arange(4.0)}, SGD1)
        version = c.stats()[0]["version"]
        stats = wire.stream_request("Stats", 9, pb.StatsRequest()).tobytes()
        bad_push = wire._REQ_HEAD.pack(wire.STREAM_CODES["Push"], 5) + b"\xff\xff\xff\xff garbage"
        answers = asyncio.run(exchange(server, [b"\x01", b"\x63\x07\x00\x00\x00", bad_push, stats], via, "tok"))
        by_id = {rid: (status, body) for rid, status, body in answers}
        assert by_id[0][0] == grpc.StatusCode.INVALID_ARGUMENT and b"shorter than" in by_id[0][1]
        assert by_id[7][0] == grpc.StatusCode.INVALID_ARGUMENT and b"method code 99" in by_id[7][1]
        assert by_id[5][0] == grpc.StatusCode.INVALID_ARGUMENT and by_id[5][1].startswith(b"InvalidArgument\0")
        assert by_id[9][0] is None and pb.StatsResponse.FromString(by_id[9][1]).rejected == 3
        assert c.stats()[0]["version"] == version
        assert torch.equal(c.pull(0, observer=True)["w"], torch.arange(4.0))


async def _refused_with(address, metadata):
    """Open a stream and read (no write: a write racing the refusal makes the client's own
    status INTERNAL): the status the server ended it with."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = wire.Stub(channel).Stream(metadata=metadata)
        with pytest.raises(grpc.aio.AioRpcError):
            await call.read()
        return await call.code()


def test_a_stream_without_the_token_is_refused_unauthenticated(server):
    for metadata in (None, bearer("wrong")):
        assert asyncio.run(_refused_with(server.address, metadata)) == grpc.StatusCode.UNAUTHENTICATED
    assert server.shard.stats()["rejected"] == 0  # refused before reaching the shard


def test_a_cancelled_request_is_withdrawn_from_the_server(server):
    """A pull waiting on the stream (ssp, for a step nobody pushes) that the client abandons ends
    at the server too: no waiting pull is left behind."""
    srv = create_server(ServerConfig(mode="ssp", staleness=0, num_workers=2))
    try:
        with PSClient([srv.address], "a", transport="stream") as a, PSClient([srv.address], "b") as b:
            for c in (a, b):
                c.setup({"w": torch.zeros(4)}, SGD1)
            a.push({"w": torch.ones(4)}, 0)
            ahead = a.prefetch(2)  # waits for b, which never pushes step 0 here
            deadline = asyncio.run(_until(lambda: srv.shard.metrics()["waiting_pulls"] == 1))
            assert deadline
            ahead.cancel()
            assert asyncio.run(_until(lambda: srv.shard.metrics()["waiting_pulls"] == 0))
    finally:
        srv.stop(grace=0)


async def _until(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            return False
        await asyncio.sleep(0.02)
    return True


def test_a_server_with_an_idle_stream_stops_at_once_and_the_client_retries_after_its_restart():
    import time

    srv = create_server(ServerConfig(mode="async"))
    port = srv.port
    with PSClient([srv.address], "w", retry_timeout=20, transport="stream") as c:
        clock = c.setup({"w": torch.zeros(4)}, SGD1)
        assert c._t.path(0) == "stream"
        t = time.monotonic()
        srv.stop(grace=2.0)
        assert time.monotonic() - t < 1.5  # the stream does not hold the stop for its grace period
        srv = create_server(ServerConfig(mode="async", port=port))  # back on its port, empty
        try:
            # the next call opens a new stream (re-registering: the restarted server is empty)
            c.hold({"w": torch.zeros(4)})
            assert c.push({"w": torch.ones(4)}, clock)[0]["outcome"] == "APPLIED"
        finally:
            srv.stop(grace=0)


def test_a_request_over_the_message_limit_fails_alone_and_the_stream_goes_on(server):
    from ps.config import MAX_MESSAGE_BYTES
    from ps.errors import ResourceExhausted

    with PSClient([server.address], "w", auth_token="tok", transport="stream") as c:
        c.setup({"w": torch.zeros(4)}, SGD1)
        huge = pb.StatsRequest()
        big = wire.Frame.of(b"\0" * (MAX_MESSAGE_BYTES + 1))
        with pytest.raises(ResourceExhausted, match="larger than the message limit"):
            c._t.run(c._t.attempt(0, "Stats", big))
        assert c._t.run(c._t.attempt(0, "Stats", huge)).initialized


@pytest.mark.parametrize("via", ["local", "tcp"])
@pytest.mark.parametrize("garbage", [
    struct.pack("<I", link.MAX_FRAME + 1) + b"x" * 64,  # a length over the limit
    struct.pack("<I", 1 << 20) + b"short",  # a frame cut off by the end of the connection
    struct.pack("<II", link.SPLIT | 64, 16) + b"y" * 64,  # a split frame: only answers are split
    b"\x01\x02",  # a length cut off
], ids=["over-limit", "cut-off", "split", "short-length"])
def test_broken_framing_on_a_socket_ends_the_connection_and_changes_nothing(server, via, garbage):
    with PSClient([server.address], "w", auth_token="tok", transport="unary") as c:
        c.setup({"w": torch.arange(4.0)}, SGD1)
        s = raw_socket(server, via)
        assert read_frame(s) == link.GREETING + server.tcp.server_id.encode()  # the server speaks first
        s.sendall(frame(link.HELLO + b"Bearer tok"))
        assert read_frame(s) == link.WELCOME
        s.sendall(garbage)
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b""  # ended, nothing answered
        s.close()
        assert c.stats()[0]["version"] == 0
        assert torch.equal(c.pull(0, observer=True)["w"], torch.arange(4.0))
        c.push({"w": torch.ones(4)}, 0)  # the server goes on serving
        assert torch.equal(c.pull(1)["w"], torch.arange(4.0) - 1)
