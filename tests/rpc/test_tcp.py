"""The data port (ps.tcp): a worker on another host sends the stream path's frames on a TCP
connection of its own. Same answers and errors as the other paths; the token checked by the
hello; pull answers received straight into the tensors asked for; a port that cannot be reached
leaves the worker on the gRPC stream; broken framing ends the connection and changes nothing;
before the hello a frame is at most 4 KiB. (TLS on the data port: tests/rpc/test_tls.py.)"""

import asyncio
import socket
import struct
import time

import pytest
import torch

from ps import link, tcp
from ps.config import OptimizerConfig, ServerConfig
from ps.errors import InvalidArgument, Unauthenticated, Unavailable, UnknownKey
from ps.proto import ps_pb2 as pb
from ps.server.app import BindError, create_server
from ps.worker import codec
from ps.worker.client import PSClient
from tests.streams import frame, read_all

SGD1 = OptimizerConfig("sgd", lr=1.0)
N = 1 << 16  # 256 KiB: a pull's answer comes as a split frame


@pytest.fixture
def server():
    srv = create_server(ServerConfig(mode="async", auth_token="tok", shm=False))  # as if on another host
    yield srv
    srv.stop(grace=0)


def test_auto_takes_the_data_port_with_the_same_answers_and_errors(server):
    with PSClient([server.address], "w", auth_token="tok", transport="auto") as c:
        clock = c.setup({"w": torch.zeros(N), "small": torch.zeros(3)}, SGD1)
        assert c.info[0].data_port == server.tcp.port and "tcp" in c.info[0].transports
        assert c.paths() == ["tcp"]
        assert c.push({"w": torch.ones(N), "small": torch.ones(3)}, clock)[0]["outcome"] == "APPLIED"
        got = c.pull(clock + 1)
        assert torch.equal(got["w"], torch.full((N,), -1.0)) and torch.equal(got["small"], torch.full((3,), -1.0))
        _, pulled = c.push_pull({"w": torch.ones(N), "small": torch.ones(3)}, clock + 1)
        assert torch.equal(pulled["small"], torch.full((3,), -2.0))
        with pytest.raises(UnknownKey, match="nope#0"):
            c._t.run(c._t.call(0, "Pull", pb.PullRequest(worker_id="w", plan_fingerprint=c.plan.fingerprint, clock=1,
                                                         keys=["nope#0"])))
        bad = torch.ones(N)
        bad[7] = float("nan")
        with pytest.raises(InvalidArgument, match="NaN"):
            c.push({"w": bad, "small": torch.ones(3)}, clock + 2)
        assert c.stats()[0]["version"] == 2
        assert torch.equal(c.pull(clock + 2)["w"], torch.full((N,), -2.0))
        assert c.paths() == ["tcp"]


def test_pull_answers_are_received_straight_into_the_tensors_asked_for(server, monkeypatch):
    decoded, decode = [], codec.tensor_into
    monkeypatch.setattr(codec, "tensor_into", lambda t, out: decoded.append(t.key) or decode(t, out))
    with PSClient([server.address], "w", auth_token="tok", transport="tcp", partition_bytes=1 << 17) as c:
        clock = c.setup({"w": torch.zeros(N), "b": torch.zeros(5)}, SGD1)
        c.push({"w": torch.arange(float(N)), "b": torch.ones(5)}, clock)
        into = {"w": torch.zeros(N), "b": torch.zeros(5)}
        ptr = into["w"].data_ptr()
        out = c.pull(clock + 1, into=into)
        assert out["w"] is into["w"] and into["w"].data_ptr() == ptr
        assert torch.equal(into["w"], -torch.arange(float(N))) and torch.equal(into["b"], -torch.ones(5))
        fresh = c.pull(clock + 1)  # into tensors of its own: the same way
        assert torch.equal(fresh["w"], -torch.arange(float(N)))
    assert not any(k.startswith("w#") for k in decoded), decoded  # w's slices (128 KiB each) were not copied


def test_a_missing_or_wrong_token_is_refused_before_any_frame_is_served(server):
    for authorization in ("", "Bearer wrong"):
        with pytest.raises(Unauthenticated, match="auth token"):
            asyncio.run(tcp.connect("127.0.0.1", server.tcp.port, authorization))
    assert server.shard.counters["unauthenticated"] == 2


def _raw(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.tcp.port), timeout=10)
    return s


def test_before_the_hello_a_frame_over_4_kib_ends_the_connection_unread(server):
    s = _raw(server)
    s.sendall(struct.pack("<I", 1 << 20) + b"x" * 5000)  # (a server that buffered it would wait for more)
    assert read_all(s) == frame(link.GREETING + server.tcp.server_id.encode())  # its greeting, and the end
    s.close()


def test_a_data_port_that_goes_away_leaves_the_worker_on_the_grpc_stream(server):
    with PSClient([server.address], "w", auth_token="tok", transport="auto") as c:
        clock = c.setup({"w": torch.zeros(N)}, SGD1)
        assert c.paths() == ["tcp"]
        asyncio.run_coroutine_threadsafe(server.tcp.stop(), server._loop).result()  # its connections too
        c.push({"w": torch.ones(N)}, clock)  # retried on a new stream: the port is gone, so by gRPC
        assert c.paths() == ["stream"]
        assert torch.equal(c.pull(clock + 1)["w"], torch.full((N,), -1.0))
        assert c.stats()[0]["version"] == 1
    with PSClient([server.address], "w2", auth_token="tok", transport="auto") as c2:  # not offered once it is gone
        c2.setup({"w": torch.zeros(N)}, SGD1)
        assert c2.info[0].data_port == 0 and "tcp" not in c2.info[0].transports and c2.paths() == ["stream"]
        with pytest.raises(InvalidArgument, match="offers no data port"):
            PSClient([server.address], "w3", auth_token="tok", transport="tcp").setup({"w": torch.zeros(N)}, SGD1)


def test_the_data_port_flag_picks_a_port_or_none_and_refuses_bad_values():
    srv = create_server(ServerConfig(mode="async", data_port=-1))
    try:
        assert srv.tcp is None
        with PSClient([srv.address], "w", transport="auto") as c:
            c.setup({"w": torch.zeros(4)}, SGD1)
            assert c.info[0].data_port == 0 and c.paths() == ["shm"]  # (this host: shared memory)
    finally:
        srv.stop(grace=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(BindError, match=f"data port 127.0.0.1:{taken.getsockname()[1]}"):
            create_server(ServerConfig(data_port=taken.getsockname()[1]))
    for port, rule in ((70000, "must be -1"), (-2, "must be -1")):
        with pytest.raises(InvalidArgument, match=rule):
            ServerConfig(data_port=port)
    with pytest.raises(InvalidArgument, match="must differ from port"):
        ServerConfig(port=5000, data_port=5000)


@pytest.mark.parametrize("keys", [2000, 7000])
def test_a_pull_of_many_small_tensors_comes_split_or_whole_by_the_size_of_its_head(server, keys):
    """A split answer's head names every tensor: 2000 such names fit its limit (over 64 KiB),
    7000 do not and come whole."""
    init = {f"encoder.layers.{i}.norm.weight": torch.zeros(8) for i in range(keys)}
    head = len(pb.PullResponse(tensors=[pb.Tensor(key=n + "#0", dtype="float32", shape=[8]) for n in init])
               .SerializeToString())
    assert (64 << 10) < head < link.MAX_HEAD if keys == 2000 else head > link.MAX_HEAD
    with PSClient([server.address], "w", auth_token="tok", transport="tcp") as c:
        clock = c.setup(init, SGD1)
        c.push({n: torch.full((8,), float(i % 7)) for i, n in enumerate(init)}, clock)
        got = c.pull(clock + 1)
        assert all(torch.equal(got[n], torch.full((8,), -float(i % 7))) for i, n in enumerate(init))
        assert c.paths() == ["tcp"]


def test_a_socket_that_greets_as_another_server_gets_nothing(server):
    other = create_server(ServerConfig(mode="async", auth_token="tok", shm=False))
    try:
        with pytest.raises(Unavailable, match="another server"):
            asyncio.run(tcp.connect("127.0.0.1", other.tcp.port, "Bearer tok", server_id=server.tcp.server_id))
        assert other.shard.counters["unauthenticated"] == 0  # not even a hello
        call = asyncio.run(tcp.connect("127.0.0.1", server.tcp.port, "Bearer tok", server_id=server.tcp.server_id))
        call.cancel()
    finally:
        other.stop(grace=0)


def test_silent_connections_from_one_address_cannot_keep_workers_off_the_data_port(server, monkeypatch):
    monkeypatch.setattr(link, "MAX_GREETING_FROM", 2)
    monkeypatch.setattr(link, "HELLO_TIMEOUT", 1.5)
    silent = [_raw(server) for _ in range(2)]
    try:
        with PSClient([server.address], "w", auth_token="tok", transport="tcp") as c:
            clock = c.setup({"w": torch.zeros(4)}, SGD1)
            assert c.paths() == ["stream"]  # refused while two from here have not said hello
            deadline = time.monotonic() + 20
            while c.paths() != ["tcp"]:  # they are closed; the worker tries the port again
                assert time.monotonic() < deadline
                c.push({"w": torch.ones(4)}, clock)
                clock += 1
                time.sleep(0.2)
            assert torch.equal(c.pull(clock)["w"], -torch.full((4,), float(clock)))
    finally:
        for s in silent:
            s.close()


def test_trying_the_data_port_again_does_not_hold_up_calls(server, monkeypatch):
    """After a failed try the port is tried again in the background: calls go on over gRPC
    meanwhile, however long a try takes (a firewall that drops packets: the connect timeout)."""
    real, tries = tcp.connect, []

    async def dropped(*args, **kwargs):
        tries.append(time.monotonic())
        await asyncio.sleep(2.0)
        raise OSError("timed out")

    monkeypatch.setattr(tcp, "connect", dropped)
    with PSClient([server.address], "w", auth_token="tok", transport="tcp") as c:
        clock = c.setup({"w": torch.zeros(4)}, SGD1)  # (the first try is waited for)
        slowest, until = 0.0, time.monotonic() + 5.0
        while time.monotonic() < until:
            start = time.monotonic()
            c.push({"w": torch.ones(4)}, clock)
            slowest, clock = max(slowest, time.monotonic() - start), clock + 1
            time.sleep(0.05)
        assert len(tries) >= 2 and slowest < 1.0 and c.paths() == ["stream"]
        monkeypatch.setattr(tcp, "connect", real)  # the port answers again: the worker moves there
        until = time.monotonic() + 20
        while c.paths() != ["tcp"]:
            assert time.monotonic() < until
            c.push({"w": torch.ones(4)}, clock)
            clock += 1
            time.sleep(0.1)
        assert torch.equal(c.pull(clock)["w"], -torch.full((4,), float(clock)))
