"""The co-located channel (ps.local): a worker on the server's host sends its stream frames over
the server's abstract Unix socket instead of a gRPC stream. Same answers and errors; the token
and the user are checked before any frame is served; a broken framing ends the connection and
changes nothing; a socket that cannot be reached leaves the worker on the gRPC stream, and a
restarted server's new socket is found at Register."""

import asyncio
import os
import socket
import time

import pytest
import torch

from ps import link, local, wire
from ps.config import OptimizerConfig, ServerConfig
from ps.errors import InvalidArgument, Unauthenticated, Unavailable, UnknownKey
from ps.proto import ps_pb2 as pb
from ps.server.app import create_server
from ps.worker.client import PSClient
from ps.worker.transport import Mux
from tests.streams import frame, read_all

pytestmark = pytest.mark.skipif(not local.SUPPORTED, reason="abstract Unix sockets are Linux's")
SGD1 = OptimizerConfig("sgd", lr=1.0)
N = 1 << 16  # above shm.MIN_BYTES: pushes and pulls take the segment


@pytest.fixture
def server():
    srv = create_server(ServerConfig(mode="async", auth_token="tok"))
    yield srv
    srv.stop(grace=0)


def _on_local(client) -> list[bool]:
    return [m is not None and m.on_local for m in client._t._mux]


def test_a_co_located_worker_streams_over_the_local_socket_with_the_same_answers_and_errors(server):
    assert server.local is not None and server.local.name.startswith("\0ps-")
    with PSClient([server.address], "w", auth_token="tok", transport="auto") as c:
        clock = c.setup({"w": torch.zeros(N), "small": torch.zeros(3)}, SGD1)
        assert c.info[0].local_socket == server.local.name
        assert c.paths() == ["shm"] and _on_local(c) == [True]
        assert c.push({"w": torch.ones(N), "small": torch.ones(3)}, clock)[0]["outcome"] == "APPLIED"
        got = c.pull(clock + 1)
        assert torch.equal(got["w"], torch.full((N,), -1.0)) and torch.equal(got["small"], torch.full((3,), -1.0))
        _, pulled = c.push_pull({"w": torch.ones(N), "small": torch.ones(3)}, clock + 1)
        assert torch.equal(pulled["small"], torch.full((3,), -2.0))
        assert c.stats()[0]["shm_segments"] == 1
        with pytest.raises(UnknownKey, match="nope#0"):
            c._t.run(c._t.call(0, "Pull", pb.PullRequest(worker_id="w", plan_fingerprint=c.plan.fingerprint, clock=1,
                                                         keys=["nope#0"])))
        bad = torch.ones(3)
        bad[1] = float("nan")
        with pytest.raises(InvalidArgument, match="NaN"):
            c.push({"w": torch.ones(N), "small": bad}, clock + 2)
        assert c.stats()[0]["version"] == 2
        assert torch.equal(c.pull(clock + 2)["small"], torch.full((3,), -2.0))


def test_no_local_socket_without_shared_memory():
    srv = create_server(ServerConfig(mode="async", shm=False))
    try:
        assert srv.local is None
        with PSClient([srv.address], "w", transport="auto") as c:
            c.setup({"w": torch.zeros(4)}, SGD1)
            assert c.info[0].local_socket == "" and c.paths() == ["tcp"] and _on_local(c) == [False]
    finally:
        srv.stop(grace=0)


def test_a_missing_or_wrong_token_is_refused_before_any_frame_is_served(server):
    for authorization in ("", "Bearer wrong", "tok"):
        with pytest.raises(Unauthenticated, match="auth token"):
            asyncio.run(local.connect(server.local.name, authorization))
    assert server.shard.counters["unauthenticated"] == 3

    async def stats_with(authorization):
        call = await local.connect(server.local.name, authorization)
        await call.write(wire.stream_request("Stats", 1, pb.StatsRequest()).tobytes())
        rid, status, body = wire.read_stream_answer(await call.read())
        call.cancel()
        return rid, status, pb.StatsResponse.FromString(bytes(body))

    rid, status, stats = asyncio.run(stats_with("Bearer tok"))
    assert (rid, status) == (1, None) and stats.rejected == 0


def _connect_raw(name: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(name)
    return s


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_a_process_of_another_user_is_refused(server):
    pid = os.fork()
    if pid == 0:  # the child: another user, plain sockets only
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = _connect_raw(server.local.name)
            try:
                s.sendall(frame(link.HELLO + b"Bearer tok"))
                answer = read_all(s)
            except (BrokenPipeError, ConnectionResetError):  # closed before the hello was read
                answer = b""
            code = 0 if answer == b"" else 2  # closed without a welcome
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert server.shard.counters["unauthenticated"] == 1


def test_a_local_socket_that_goes_away_leaves_the_worker_on_the_grpc_stream(server):
    with PSClient([server.address], "w", auth_token="tok", transport="auto") as c:
        clock = c.setup({"w": torch.zeros(N)}, SGD1)
        assert _on_local(c) == [True]
        asyncio.run_coroutine_threadsafe(server.local.stop(), server._loop).result()  # its connections too
        c.push({"w": torch.ones(N)}, clock)  # retried on a new stream, by gRPC, with a new segment
        assert c.paths() == ["shm"] and _on_local(c) == [False]
        assert torch.equal(c.pull(clock + 1)["w"], torch.full((N,), -1.0))
        assert c.info[0].local_socket == server.local.name  # (named at Register, before it went)
        assert c.stats()[0]["version"] == 1
    with PSClient([server.address], "w2", auth_token="tok", transport="auto") as c2:  # not named once it is gone
        c2.setup({"w": torch.zeros(N)}, SGD1)
        assert c2.info[0].local_socket == "" and c2.paths() == ["shm"] and _on_local(c2) == [False]


def _squat(name: str, uid: int | None = None) -> tuple[int, int]:
    """Fork a process (of user `uid`, else this one's) that binds `name`, takes one connection
    and reports what it was sent: (its pid, the fd to read "empty" or "got:..." from), once it
    listens."""
    ready, result = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: plain sockets only
        got = b"?"
        try:
            if uid is not None:
                os.setgid(uid)
                os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(name)
            s.listen(1)
            os.write(ready[1], b"r")
            s.settimeout(10)
            conn, _ = s.accept()
            conn.settimeout(3)
            try:
                got = conn.recv(4096)
            except (socket.timeout, OSError):
                got = b""
        finally:
            os.write(result[1], b"empty" if got == b"" else b"got:" + got[:40])
            os._exit(0)
    assert os.read(ready[0], 1) == b"r"
    return pid, result[0]


@pytest.mark.parametrize("user", ["same", "other"])
def test_a_worker_sends_nothing_to_a_process_that_holds_the_servers_socket_name(user):
    """Abstract names can be bound by anyone once free: the worker checks that the other end is
    the process the name names (the server's pid) of its own user before it sends its token."""
    if user == "other" and os.geteuid() != 0:
        pytest.skip("needs root to run a process as another user")
    name = local.new_name()  # names this (test) process, bound by another one
    pid, result = _squat(name, 65534 if user == "other" else None)
    try:
        with pytest.raises(Unavailable, match="held by process %d of user %d" % (pid, 65534 if user == "other"
                                                                                 else os.geteuid())):
            asyncio.run(local.connect(name, "Bearer tok"))
        assert os.read(result, 64) == b"empty"  # it got nothing, the token least of all
    finally:
        os.waitpid(pid, 0)


def test_a_restarted_server_is_followed_to_its_new_local_socket():
    first = create_server(ServerConfig(mode="async"))
    port, old = first.port, first.local.name
    with PSClient([first.address], "w", transport="auto", retry_timeout=30) as c:
        clock = c.setup({"w": torch.zeros(N)}, SGD1)
        weights = c.pull(clock)
        c.hold(weights)
        assert _on_local(c) == [True]
        first.stop(grace=0)
        second = create_server(ServerConfig(mode="async", port=port))
        try:
            assert second.local.name != old
            # The old socket is gone: the worker falls back to the gRPC stream, is told it is
            # unknown there, registers again (re-initialising the empty server from the weights
            # it holds) and takes the new socket from that answer.
            assert c.push({"w": torch.ones(N)}, clock)[0]["outcome"] in ("APPLIED", "EVICTED")
            c.pull(clock + 1, into=weights)
            assert c.info[0].local_socket == second.local.name
            c.push({"w": torch.ones(N)}, clock + 1)
            assert _on_local(c) == [True]
        finally:
            second.stop(grace=0)


def test_a_request_placed_while_its_local_connection_closes_is_retried_not_left_waiting(server, monkeypatch):
    """The connection ends while a push is being copied into the segment: the push finds its
    stream ended and is retried on a new one (by gRPC now), instead of waiting out its deadline."""
    ended = []
    place = Mux._place

    async def place_while_the_server_drops_the_connection(self, s, body, answer_bytes):
        if not ended:
            ended.append(asyncio.run_coroutine_threadsafe(server.local.stop(), server._loop))
            await asyncio.sleep(0.3)  # the reader has seen the end
        return await place(self, s, body, answer_bytes)

    with PSClient([server.address], "w", auth_token="tok", transport="auto", rpc_timeout=5) as c:
        clock = c.setup({"w": torch.zeros(N)}, SGD1)
        assert _on_local(c) == [True]
        monkeypatch.setattr(Mux, "_place", place_while_the_server_drops_the_connection)
        assert c.push({"w": torch.ones(N)}, clock)[0]["outcome"] == "APPLIED"  # (not DeadlineExceeded)
        assert ended and _on_local(c) == [False]
        assert torch.equal(c.pull(clock + 1)["w"], torch.full((N,), -1.0))


def test_connections_that_never_say_hello_are_closed_and_capped(server, monkeypatch):
    monkeypatch.setattr(link, "HELLO_TIMEOUT", 1.0)
    monkeypatch.setattr(link, "MAX_GREETING", 2)
    silent = [_connect_raw(server.local.name) for _ in range(2)]
    time.sleep(0.2)  # the server has taken them
    extra = _connect_raw(server.local.name)
    extra.settimeout(0.5)  # (less than the time to say hello)
    assert read_all(extra) == b""  # over the cap: closed at once
    for s in silent:  # greeted, then closed once their time to say hello is up
        assert read_all(s) == frame(link.GREETING + server.local.server_id.encode())
        s.close()
    extra.close()
    with PSClient([server.address], "w", auth_token="tok", transport="auto") as c:  # and serving still
        c.setup({"w": torch.zeros(4)}, SGD1)
        assert _on_local(c) == [True]


def test_the_per_address_cap_does_not_apply_to_the_local_socket(server, monkeypatch):
    """Its peers are all of this host and user (checked by SO_PEERCRED): only the total cap
    applies, so idle local connections do not keep co-located workers off it."""
    monkeypatch.setattr(link, "MAX_GREETING_FROM", 1)
    idle = [_connect_raw(server.local.name) for _ in range(3)]
    try:
        with PSClient([server.address], "w", auth_token="tok", transport="auto") as c:
            c.setup({"w": torch.zeros(4)}, SGD1)
            assert _on_local(c) == [True]
    finally:
        for s in idle:
            s.close()
