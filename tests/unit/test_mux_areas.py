"""The stream client's bookkeeping of shared-memory areas (ps.worker.transport.Mux): a request
withdrawn (cancelled, or past its deadline) in the very turn its answer is read gives its areas
back at once; none is left parked for an answer that already came. The server's side is played
by a stand-in for the gRPC call, answering by hand."""

import asyncio

import pytest

from ps import shm, wire
from ps.errors import DeadlineExceeded
from ps.proto import ps_pb2 as pb
from ps.worker.transport import Mux, _expire, _Open


class _Call:
    def __init__(self):
        self.answers, self.sent = asyncio.Queue(), []

    async def write(self, data):
        self.sent.append(bytes(data))

    async def read(self):
        return await self.answers.get()

    def cancel(self):
        pass

    async def code(self):
        pass


class _Segment:
    def close(self):
        pass


async def _withdrawn_as_answered(how: str):
    mux = Mux(None, "stand-in", None)
    call = _Call()
    s = mux._open = _Open(call)
    s.seg = _Segment()
    s.requests, s.answers = shm.Areas(0, 1 << 20), shm.Areas(1 << 20, 2 << 20)
    reader = asyncio.ensure_future(mux._read(s))
    task = asyncio.ensure_future(mux.request("Stats", pb.StatsRequest(), 30.0, answer_bytes=1 << 17))
    while not call.sent:
        await asyncio.sleep(0)
    rid = int.from_bytes(call.sent[0][1:5], "little")
    for _ in range(5):
        await asyncio.sleep(0)  # the caller awaits its answer
    assert s.answers.used  # its answer area is taken
    call.answers.put_nowait(wire.stream_answer(rid, pb.StatsResponse()).tobytes())  # in: the reader wakes first
    if how == "cancel":
        task.cancel()
    else:
        _expire(s.pending[rid])  # its deadline passes in the same turn
    for _ in range(10):
        await asyncio.sleep(0)
    outcome = task.cancelled() or type(task.exception())
    reader.cancel()
    return outcome, dict(s.retired), dict(s.answers.used)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_request_withdrawn_as_its_answer_comes_gives_its_areas_back(how):
    outcome, retired, used = asyncio.run(_withdrawn_as_answered(how))
    assert outcome is (True if how == "cancel" else DeadlineExceeded)
    assert retired == {} and used == {}
