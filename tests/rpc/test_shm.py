"""The shared-memory path (transport "shm"): chosen when worker and server share a host, never
across network namespaces; the same answers and error codes as the other paths; garbage in
offers and descriptors refused with a specific status, changing nothing; segments (memory files,
no names) unmapped when their worker leaves, is evicted or dies."""

import asyncio
import io
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest
import torch

from ps import shm, wire
from ps.cli.launch import start_servers, stop_all
from ps.config import OptimizerConfig, ServerConfig
from ps.errors import InvalidArgument, UnknownKey
from ps.proto import ps_pb2 as pb
from ps.server.app import create_server
from ps.worker.client import PSClient
from ps.worker.codec import Lapsed, Pulled
from tests.netns import usable, veth_namespace
from tests.streams import VIAS, exchange

SGD1 = OptimizerConfig("sgd", lr=1.0)
N = 1 << 16  # 256 KiB of fp32: above shm.MIN_BYTES, so pushes and pulls take the segment


@pytest.fixture
def server():
    srv = create_server(ServerConfig(mode="async"))
    yield srv
    srv.stop(grace=0)


def _until(predicate, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def test_auto_takes_shared_memory_on_this_host_with_the_same_answers_and_errors(server):
    with PSClient([server.address], "w", transport="auto") as c:
        clock = c.setup({"w": torch.zeros(N)}, SGD1)
        assert c.paths() == ["shm"]
        assert c.push({"w": torch.ones(N)}, clock)[0]["outcome"] == "APPLIED"
        assert torch.equal(c.pull(clock + 1)["w"], torch.full((N,), -1.0))
        stats = c.stats()[0]
        assert stats["shm_segments"] == 1 and stats["shm_bytes"] >= 2 * 4 * N  # the push and the pull went there
        assert c._t._mux[0]._open.seg.fd == -1  # the worker's fd went once the server had opened it
        with pytest.raises(UnknownKey, match="nope#0"):  # the same error class and message as unary
            c._t.run(c._t.call(0, "Pull", pb.PullRequest(worker_id="w", plan_fingerprint=c.plan.fingerprint, clock=1,
                                                         keys=["nope#0"]), answer_bytes=1 << 20))
        bad = torch.ones(N)
        bad[7] = float("nan")
        with pytest.raises(InvalidArgument, match="NaN"):
            c.push({"w": bad}, clock + 1)
        assert c.stats()[0]["version"] == 1 and torch.equal(c.pull(clock + 1)["w"], torch.full((N,), -1.0))
        c.leave()
        assert _until(lambda: server.shard.stats()["active_workers"] == 0)
        # Leaving ends the stream that held the segment: the server no longer maps it.
        assert _until(lambda: PSClient.stats(c)[0]["shm_segments"] == 0)


def test_through_shared_memory_a_shards_slices_go_in_one_request_each_way_applied_from_the_segment(server):
    """Requests through shared memory group a shard's slices up to WIDE_BYTES (4 slices of 256
    KiB: one pull request, not 4 as on a socket), the push applied from the segment itself (a
    NaN in it still refused, nothing changed), the same weights as the data port gets."""
    part = 1 << 18  # bytes per slice: 4 slices of 65536 floats
    start = torch.arange(4 * part // 4, dtype=torch.float32) / 1000
    grad = torch.linspace(-1, 1, 4 * part // 4)
    with PSClient([server.address], "w", transport="shm", partition_bytes=part) as c:
        clock = c.setup({"w": start.clone()}, OptimizerConfig("sgd", lr=0.5))
        assert len(c.plan.slices_for(0)) == 4
        c.pull(clock)  # the stream is open and its segment mapped from here on
        assert c.paths() == ["shm"]
        before = c.stats()[0]
        assert c.push({"w": grad}, clock)[0]["outcome"] == "APPLIED"
        weights = c.pull(clock + 1)["w"]
        after = c.stats()[0]
        assert after["pulls"] - before["pulls"] == 1
        assert after["shm_bytes"] - before["shm_bytes"] >= 2 * 4 * start.numel()
        bad = grad.clone()
        bad[-3] = float("inf")  # in the last slice: checked where it lies
        with pytest.raises(InvalidArgument, match="NaN or Inf"):
            c.push({"w": bad}, clock + 1)
        assert torch.equal(c.pull(clock + 1)["w"], weights)
        with PSClient([server.address], "w", transport="tcp", partition_bytes=part) as t:
            t.attach(c.plan.params)
            before = t.stats()[0]["pulls"]
            assert torch.equal(t.pull(clock + 1, observer=True)["w"], weights) and t.stats()[0]["pulls"] - before == 4
    assert torch.equal(weights, start - 0.5 * grad)


def _raw_pull(c: PSClient, clock: int) -> wire.PullIn:
    """A pull's answer as it comes (an answer by reference: views of the server's slices, held
    until its `done`)."""
    keys = [s.key for s in c.plan.slices_for(0)]
    req = pb.PullRequest(worker_id=c.worker_id, plan_fingerprint=c.plan.fingerprint, clock=clock, keys=keys)
    return c._t.run(c._t.call(0, "Pull", req, answer_bytes=4 * N + 4096))


def test_pulls_through_shared_memory_read_the_servers_published_slices_until_released(server):
    """A pull through shared memory is answered with where the slices lie in the server's
    published memory, which the worker maps read-only (it can neither write it nor map it
    writable) and copies from. What it was answered does not change until it releases it (an
    update meanwhile goes to another buffer); then the next pull sees the update."""
    with PSClient([server.address], "reader", transport="shm") as c, \
            PSClient([server.address], "writer", transport="unary") as w:
        clock = c.setup({"w": torch.zeros(N)}, SGD1)
        w.register(c.plan.params)
        assert torch.equal(c.pull(clock)["w"], torch.zeros(N))
        stats = c.stats()[0]
        assert stats["shm_published"] == 1 and stats["shm_lent_bytes"] == 0  # read, then released at once
        chunk = next(iter(c._t._mux[0].windows.values()))
        at = chunk.bytes.ctypes.data  # (the server, in this process, maps the same memory read-write)
        mapping = next(line.split() for line in open("/proc/self/maps")
                       if int(line.split("-")[0], 16) == at)
        assert mapping[1] == "r--s" and "memfd:ps-arena" in mapping[-2]  # read-only, shared
        path = "/proc/{}/fd/{}".format(*chunk.name.split(":"))
        fd = os.open(path, os.O_RDWR)
        try:  # sealed against writes and new writable mappings
            with pytest.raises(PermissionError):
                mmap.mmap(fd, chunk.size)
            with pytest.raises(PermissionError):
                os.pwrite(fd, b"x", 4096)
        finally:
            os.close(fd)

        held = _raw_pull(c, clock)
        seen = [bytes(t.data) for t in held.tensors]
        assert c.stats()[0]["shm_lent_bytes"] == 4 * N
        assert w.push({"w": torch.ones(N)}, clock)[0]["outcome"] == "APPLIED"  # while the answer is held
        assert [bytes(t.data) for t in held.tensors] == seen  # not torn: the update went elsewhere
        held.done()
        assert _until(lambda: c.stats()[0]["shm_lent_bytes"] == 0)
        assert w.push({"w": torch.ones(N)}, clock + 1)[0]["outcome"] == "APPLIED"
        assert torch.equal(c.pull(clock)["w"], torch.full((N,), -2.0))
        assert c.stats()[0]["shm_published"] == 3

        # A worker that does not release gets copies once it holds more than twice the shard's bytes.
        kept = [_raw_pull(c, clock) for _ in range(4)]
        stats = c.stats()[0]
        assert stats["shm_published"] == 6 and stats["shm_lent_bytes"] == 3 * 4 * N
        assert all(torch.equal(torch.frombuffer(bytearray(p.tensors[0].data), dtype=torch.float32),
                               torch.full((N,), -2.0)) for p in kept)
        del kept  # gone without `done`: released as they are collected
        assert _until(lambda: c.stats()[0]["shm_lent_bytes"] == 0)

        # An answer read after its stream ended (the server lets go of what a stream held a while
        # after) is refused as lapsed, and a pull reads it again.
        held = _raw_pull(c, clock)
        c.leave()  # the server ends the worker's streams
        assert _until(lambda: c._t._mux[0]._open is None)
        with pytest.raises(Lapsed, match="read again"):
            Pulled(c.plan, c.servers, None, None).absorb(0, held)


def test_a_model_with_an_empty_parameter_is_still_answered_by_reference(server):
    with PSClient([server.address], "w", transport="shm") as c:
        clock = c.setup({"w": torch.ones(N), "e": torch.zeros(0)}, SGD1)
        c.pull(clock)
        pulled = c.pull(clock)
        assert torch.equal(pulled["w"], torch.ones(N)) and pulled["e"].shape == (0,)
        assert c.stats()[0]["shm_published"] == 2


def test_push_pull_of_a_large_shard_through_shared_memory_pushes_then_pulls_by_reference(server):
    from ps.worker.client import BY_REFERENCE

    with PSClient([server.address], "w", transport="shm") as c:
        big = BY_REFERENCE // 4
        clock = c.setup({"w": torch.zeros(big), "v": torch.zeros(16)}, SGD1)
        c.pull(clock)
        before = c.stats()[0]
        _, weights = c.push_pull({"w": torch.ones(big), "v": torch.ones(16)}, clock)
        after = c.stats()[0]
        assert torch.equal(weights["w"], torch.full((big,), -1.0)) and torch.equal(weights["v"], torch.full((16,), -1.0))
        assert after["shm_published"] - before["shm_published"] == 1  # pushed, then pulled by reference


def test_push_pull_of_a_small_shard_through_shared_memory_is_one_round_trip(server):
    with PSClient([server.address], "s", transport="shm") as c:
        clock = c.setup({"s": torch.zeros(N)}, SGD1)
        c.pull(clock)
        before = c.stats()[0]
        _, weights = c.push_pull({"s": torch.ones(N)}, clock)
        after = c.stats()[0]
        assert torch.equal(weights["s"], torch.full((N,), -1.0))
        assert after["shm_published"] == before["shm_published"] and after["pulls"] - before["pulls"] == 1


def test_pulls_of_slices_updated_in_place_are_copied_into_the_answer_area(server):
    """Adam updates in place: its pulls through shared memory are written into the worker's
    answer area (no answer by reference), with the same weights."""
    with PSClient([server.address], "w", transport="shm") as c:
        clock = c.setup({"w": torch.zeros(N)}, OptimizerConfig("adam", lr=0.1))
        c.push({"w": torch.ones(N)}, clock)
        assert torch.allclose(c.pull(clock + 1)["w"], torch.full((N,), -0.1))
        stats = c.stats()[0]
        assert stats["shm_published"] == 0 and stats["shm_bytes"] >= 3 * 4 * N


def test_shm_is_refused_clearly_where_the_server_does_not_offer_it():
    srv = create_server(ServerConfig(mode="async", shm=False))
    try:
        with PSClient([srv.address], "w", transport="shm") as c:
            with pytest.raises(InvalidArgument, match="does not offer it"):
                c.setup({"w": torch.zeros(4)}, SGD1)
        with PSClient([srv.address], "w2", transport="auto") as c:
            c.setup({"w": torch.zeros(N)}, SGD1)
            assert c.paths() == ["tcp"]  # (the data port: shared memory is not offered)
    finally:
        srv.stop(grace=0)


async def _exchange(server, frames, via="grpc"):
    """Raw frames on one stream; {id: (status, body)} of the answers."""
    return {rid: (status, body) for rid, status, body in await exchange(server, frames, via)}


def _status(answer):
    status, body = answer
    return status, body.split(b"\0")[0].decode()


@pytest.mark.parametrize("via", VIAS)
def test_bad_offers_and_descriptors_get_specific_codes_and_change_nothing(server, via):
    with PSClient([server.address], "good", transport="unary") as c:
        c.setup({"w": torch.arange(8.0)}, SGD1)
        fp = c.plan.fingerprint
        seg = shm.Segment.create(1 << 20)
        try:
            offers = asyncio.run(_exchange(server, [
                wire.segment_offer(1, "../../etc/passwd", bytes(16), "good"),
                wire.segment_offer(2, seg.name, b"x" * 16, "good"),  # not the nonce in the segment
                wire.segment_offer(3, seg.name, seg.worker_nonce, "stranger"),  # not registered
                wire._REQ_HEAD.pack(wire.SEGMENT, 4) + b"\x05",  # truncated
                wire.stream_request("Stats", 5, pb.StatsRequest(), shm=(64, 0, 128, 4096)),  # no segment here
            ], via))
            assert _status(offers[1]) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument")
            assert _status(offers[2]) == (grpc.StatusCode.FAILED_PRECONDITION, "ShmUnavailable")
            assert _status(offers[3]) == (grpc.StatusCode.FAILED_PRECONDITION, "UnknownWorker")
            assert _status(offers[4]) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument")
            assert _status(offers[5]) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument")
            assert b"no segment" in offers[5][1]

            garbage = b"\xff" * 64
            seg.write(4096, [garbage])
            grad = torch.ones(8)
            push = wire.push_frame(pb.PushRequest(worker_id="good", plan_fingerprint=fp, clock=0, part=0, num_parts=1),
                                   [wire.tensor_frame("w#0", "float32", [8], grad.numpy())])
            seg.write(8192, push.chunks)
            answers = asyncio.run(_exchange(server, [
                wire.segment_offer(1, seg.name, seg.worker_nonce, "good"),
                wire.segment_offer(2, seg.name, seg.worker_nonce, "good"),  # a second one on the stream
                wire.stream_request("Push", 3, None, shm=(seg.size - 8, 64, 0, 0)),  # past the end
                wire.stream_request("Push", 4, None, shm=(0, 64, 0, 0)),  # over the header
                wire.stream_request("Push", 5, None, shm=(4096, 64, 0, 0)),  # garbage bytes there
                wire.stream_request("Stats", 6, pb.StatsRequest(), shm=(0, 0, 1 << 19, 1 << 19)),
                wire.stream_request("Stats", 7, pb.StatsRequest(), shm=(0, 0, 1 << 19, 1 << 30)),  # area too large
                wire._REQ_HEAD.pack(wire.RELEASE, 8) + b"\x01\x02\x03",  # not a list of u64 leases
            ], via))
            assert answers[1] == (None, bytes(seg.server_nonce))
            for rid in (2, 3, 4, 5, 7, 8):
                assert _status(answers[rid]) == (grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument"), rid
            status, body = answers[6]  # the answer was written into the area given
            assert status == wire.IN_SHM
            stats = pb.StatsResponse.FromString(bytes(seg.view(1 << 19, wire.shm_answer_length(memoryview(body)))))
            assert stats.shm_segments == 1 and stats.version == 0
            assert c.stats()[0]["version"] == 0  # nothing applied
            assert torch.equal(c.pull(0, observer=True)["w"], torch.arange(8.0))
            assert _until(lambda: c.stats()[0]["shm_segments"] == 0)  # that stream ended

            # Released by the worker, it cannot be offered again. A new segment carries the good
            # push, applied once.
            seg.release()
            again = asyncio.run(_exchange(server, [wire.segment_offer(1, seg.name, seg.worker_nonce, "good")], via))
            assert _status(again[1]) == (grpc.StatusCode.FAILED_PRECONDITION, "ShmUnavailable")
            fresh = shm.Segment.create(1 << 20)
            fresh.write(8192, push.chunks)
            answers = asyncio.run(_exchange(server, [
                wire.segment_offer(1, fresh.name, fresh.worker_nonce, "good"),
                wire.stream_request("Push", 2, None, shm=(8192, push.size, 0, 0)),
            ], via))
            fresh.close()
            assert pb.PushResponse.FromString(answers[2][1]).outcome == pb.PushResponse.APPLIED
            assert torch.equal(c.pull(1)["w"], torch.arange(8.0) - 1)
        finally:
            seg.close()


_VICTIM = textwrap.dedent("""
    import sys, time, torch
    from ps.config import OptimizerConfig
    from ps.worker.client import PSClient
    c = PSClient([sys.argv[1]], sys.argv[2], transport=sys.argv[3])
    clock = c.setup({"w": torch.zeros(1 << 16)}, OptimizerConfig("sgd", lr=1.0))
    c.push({"w": torch.ones(1 << 16)}, clock)
    print(",".join(c.paths()), flush=True)
    if sys.argv[4] == "stay":
        time.sleep(600)
    if sys.argv[4] == "wait":  # a pull that waits for a worker that never pushes (ssp, staleness 0)
        c.pull(clock + 1)
""")


def _mapped(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if "memfd:ps-segment" in line]


@pytest.mark.parametrize("doing", ["stay", "wait"])
def test_a_killed_workers_segment_is_reclaimed(doing):
    """At once, not when the worker's lease runs out (60 s here), even with a pull waiting."""
    procs = start_servers(1, "ssp", 2, staleness=0, worker_timeout=60, out=io.StringIO())
    other = PSClient([procs[0].address], "other")  # registered, never pushes: the victim's pull waits for it
    other.setup({"w": torch.zeros(1 << 16)}, SGD1)
    victim = subprocess.Popen([sys.executable, "-c", _VICTIM, procs[0].address, "victim", "shm", doing],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert victim.stdout.readline().strip() == "shm"
        server_pid = procs[0].popen.pid
        assert len(_mapped(server_pid)) == 1  # mapped by the server (no name: a memory file)
        time.sleep(0.3)  # (wait: the pull is out)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        assert _until(lambda: not _mapped(server_pid)), _mapped(server_pid)
        assert other.stats()[0]["shm_segments"] == 0 and other.stats()[0]["active_workers"] == 2  # not evicted
    finally:
        victim.kill()
        other.close()
        stop_all(procs)


HOST_IP, NS_IP = "10.232.0.1", "10.232.0.2"


@pytest.mark.skipif(not usable(), reason="needs root and network namespaces")
def test_a_worker_in_another_network_namespace_never_chooses_shm():
    with veth_namespace(HOST_IP, NS_IP) as (ns, _):
        procs = start_servers(1, "async", 2, host=HOST_IP, out=io.StringIO())
        try:
            address = procs[0].address

            def run(prefix, worker, transport):
                return subprocess.run(prefix + [sys.executable, "-c", _VICTIM, address, worker, transport, "go"],
                                      capture_output=True, text=True, timeout=120)

            elsewhere = run(["ip", "netns", "exec", ns], "far", "auto")
            assert elsewhere.returncode == 0, elsewhere.stderr
            assert elsewhere.stdout.strip() == "tcp"  # the data port: the fastest path between hosts
            refused = run(["ip", "netns", "exec", ns], "far2", "shm")
            assert refused.returncode != 0 and "is not on this host" in refused.stderr
            here = run([], "near", "auto")  # the same server from its own namespace: shared memory
            assert here.returncode == 0 and here.stdout.strip() == "shm", here.stderr
        finally:
            stop_all(procs)


def test_an_evicted_worker_loses_its_segment_and_gets_a_new_one_when_it_registers_again():
    srv = create_server(ServerConfig(mode="async", worker_timeout=0.5))
    try:
        with PSClient([srv.address], "w", transport="shm", heartbeat=False) as c:
            clock = c.setup({"w": torch.zeros(N)}, SGD1)
            c.hold({"w": torch.zeros(N)})
            assert c.paths() == ["shm"]
            assert _until(lambda: srv.shard.stats()["evictions"] == 1)
            assert _until(lambda: c.paths() == ["stream"])  # the server ended the stream its segment was on
            result = c.push({"w": torch.ones(N)}, clock)[0]
            assert result["outcome"] in ("APPLIED", "EVICTED")
            c.pull(c.clock_floor)
            assert c.paths() == ["shm"] and c.stats()[0]["shm_segments"] == 1
    finally:
        srv.stop(grace=0)


def _free(areas) -> int:
    return sum(e - s for s, e in areas.free)


def test_the_areas_of_withdrawn_and_answered_requests_all_come_back():
    """A cancelled prefetch and a pull that outwaits its deadline (asked again) withdraw requests
    whose answer areas the server may still write: each comes back once the server says it is
    done, and later pulls still go through shared memory."""
    import threading

    srv = create_server(ServerConfig(mode="ssp", staleness=0, num_workers=2))
    try:
        with PSClient([srv.address], "a", transport="shm", rpc_timeout=1, partition_bytes=1 << 17) as a, \
                PSClient([srv.address], "b", transport="unary", partition_bytes=1 << 17) as b:
            init = {"w": torch.zeros(N), "b": torch.zeros(3)}  # w in 2 parts, b a small part sent inline
            for c in (a, b):
                c.setup(init, SGD1)
            s = a._t._mux[0]._open
            sizes = (_free(s.requests), _free(s.answers))
            grads = {n: torch.ones_like(t) for n, t in init.items()}
            a.push(grads, 0)
            ahead = a.prefetch(2)  # waits for b's step 0, which is not coming yet
            assert _until(lambda: srv.shard.metrics()["waiting_pulls"] >= 1)
            ahead.cancel()
            late = threading.Timer(2.5, lambda: b.push(grads, 0))
            late.start()
            assert torch.equal(a.pull(1)["w"], torch.full((N,), -2.0))  # past its 1 s deadline, asked again
            late.join()
            assert a._t._mux[0]._open is s  # the same stream and segment throughout
            assert _until(lambda: not s.retired and (_free(s.requests), _free(s.answers)) == sizes), \
                (s.retired, sizes, _free(s.requests), _free(s.answers), s.requests.used, s.answers.used)
            moved = srv.shard.stats()["pulls"], a.stats()[0]["shm_bytes"]
            a.pull(1)
            assert a.stats()[0]["shm_bytes"] - moved[1] >= 4 * N  # this pull went through the segment too
    finally:
        srv.stop(grace=0)


class _Raw:
    """One Stream call driven a frame at a time: ask(frame) -> (status, body)."""

    def __init__(self, address):
        import queue

        self.frames = queue.Queue()
        self.channel = grpc.insecure_channel(address)
        self.answers = self.channel.stream_stream("/ps.ParameterServer/Stream")(iter(self.frames.get, None))

    def send(self, frame) -> None:
        self.frames.put(frame.tobytes() if isinstance(frame, wire.Frame) else frame)

    def read(self):
        rid, status, body = wire.read_stream_answer(next(self.answers))
        return rid, status, bytes(body)

    def ask(self, frame):
        self.send(frame)
        return self.read()[1:]

    def close(self) -> None:
        self.frames.put(None)
        self.channel.close()


def test_a_push_part_rewritten_in_the_segment_after_it_was_taken_changes_nothing(server):
    """The server copies a request out of the segment before checking it: a held part (the first
    of two) rewritten with NaN afterwards is not what gets applied."""
    n = 8192  # 32 KiB parts: above wire.SMALL, so nothing copies them on the way
    with PSClient([server.address], "good", transport="unary") as c:
        c.setup({"w": torch.zeros(n), "v": torch.zeros(n)}, SGD1)
        fp = c.plan.fingerprint
        keys = sorted(s.key for s in c.plan.slices_for(0))

        def part(i, values):
            header = pb.PushRequest(worker_id="good", plan_fingerprint=fp, clock=0, part=i, num_parts=2)
            return wire.push_frame(header, [wire.tensor_frame(keys[i], "float32", [n], values.numpy())])

        seg = shm.Segment.create(1 << 20)
        raw = _Raw(server.address)
        try:
            assert raw.ask(wire.segment_offer(1, seg.name, seg.worker_nonce, "good"))[0] is None
            first, second = part(0, torch.ones(n)), part(1, torch.ones(n))
            seg.write(4096, first.chunks)
            status, body = raw.ask(wire.stream_request("Push", 2, None, shm=(4096, first.size, 0, 0)))
            assert pb.PushResponse.FromString(body).outcome == pb.PushResponse.BUFFERED
            seg.write(4096, part(0, torch.full((n,), float("nan"))).chunks)  # after the server took it
            seg.write(65536, second.chunks)
            status, body = raw.ask(wire.stream_request("Push", 3, None, shm=(65536, second.size, 0, 0)))
            assert pb.PushResponse.FromString(body).outcome == pb.PushResponse.APPLIED
        finally:
            raw.close()
            seg.close()
        final = c.pull(1)
        assert torch.equal(final["w"], torch.full((n,), -1.0)) and torch.equal(final["v"], torch.full((n,), -1.0))


def test_a_withdrawn_pull_is_answered_cancelled_only_once_its_answer_area_is_no_longer_written(server, monkeypatch):
    n = 300_000  # above the servicer's INLINE_ELEMENTS: the pull is encoded on the thread pool
    with PSClient([server.address], "good", transport="unary") as c:
        c.setup({"w": torch.zeros(n)}, SGD1)
        fp, keys = c.plan.fingerprint, [s.key for s in c.plan.slices_for(0)]
        seg = shm.Segment.create(8 << 20)
        written = []
        slow_write = shm.Segment.write

        def write(self, offset, chunks):
            time.sleep(0.5)
            out = slow_write(self, offset, chunks)
            written.append(time.monotonic())
            return out

        raw = _Raw(server.address)
        try:
            assert raw.ask(wire.segment_offer(1, seg.name, seg.worker_nonce, "good"))[0] is None
            monkeypatch.setattr(shm.Segment, "write", write)
            pull = pb.PullRequest(worker_id="good", plan_fingerprint=fp, clock=0, keys=keys)
            raw.send(wire.stream_request("Pull", 2, pull, shm=(0, 0, 4096, 4 << 20)))
            time.sleep(0.2)  # the server is writing the answer into the area now
            raw.send(wire.stream_request("", 2, None))  # withdrawn
            rid, status, _ = raw.read()
            answered = time.monotonic()
            assert rid == 2 and status == grpc.StatusCode.CANCELLED
            assert written and answered >= written[0]  # not before the write into the area had ended
        finally:
            raw.close()
            seg.close()


def test_a_worker_unmaps_the_chunks_answers_no_longer_name(server, monkeypatch):
    """Copies on write spread a shard over several chunks while answers are held; once they are
    let go, the server closes chunks left empty, and the worker unmaps what the answers stopped
    naming (WINDOW_IDLE seconds on; 0 here): only the chunk the last answer named stays mapped."""
    from ps.worker import transport

    monkeypatch.setattr(transport, "WINDOW_IDLE", 0.0)
    n = 1 << 18  # 1 MiB: each copy on write takes a chunk of its own
    with PSClient([server.address], "r", transport="shm") as c, \
            PSClient([server.address], "w", transport="unary") as w:
        clock = c.setup({"w": torch.zeros(n)}, SGD1)
        w.register(c.plan.params)
        c.pull(clock)
        keys = [s.key for s in c.plan.slices_for(0)]
        req = pb.PullRequest(worker_id="r", plan_fingerprint=c.plan.fingerprint, clock=clock, keys=keys)
        held, seen = [], {}
        for step in range(3):
            held.append(c._t.run(c._t.call(0, "Pull", req, answer_bytes=4 * n + 4096)))
            seen.update({id(v): v for v in c._t._mux[0].windows.values()})
            w.push({"w": torch.ones(n)}, clock + step)  # the held buffer is not written: another is taken
        assert len(seen) >= 2  # the answers named more than one chunk
        for p in held:
            p.done()
        del held, p
        assert _until(lambda: c.stats()[0]["shm_lent_bytes"] == 0)
        w.push({"w": torch.ones(n)}, clock + 3)  # an allocation: the server gives back and closes
        assert torch.equal(c.pull(clock)["w"], torch.full((n,), -4.0))
        (kept,) = c._t._mux[0].windows.values()
        assert all(v.bytes is None for v in seen.values() if v is not kept)  # unmapped
