"""The client's push/pull encoding: which part's outcome stands for a shard's push, and pull
answers checked to cover what was asked."""

import pytest
import torch

from ps import wire
from ps.errors import InvalidArgument
from ps.proto import ps_pb2 as pb
from ps.serde import dense_frame
from ps.sharding import ParamSpec, make_plan
from ps.worker.codec import Pulled, push_results

O = pb.PushResponse


def _r(outcome, version=0):
    return pb.PushResponse(outcome=outcome, version=version)


def test_the_part_that_completed_a_push_outranks_parts_resent_after_it():
    # part 0 was refused and resent: it completed the push; parts 1 and 2, resent after it, are duplicates
    responses = [(0, _r(O.APPLIED, 5)), (0, _r(O.DUPLICATE, 5)), (0, _r(O.DUPLICATE, 5)), (1, _r(O.BUFFERED)),
                 (1, _r(O.ACCUMULATED, 3))]
    assert [r["outcome"] for r in push_results(responses)] == ["APPLIED", "ACCUMULATED"]


def test_evicted_outranks_everything_and_a_retry_stays_a_duplicate():
    assert push_results([(0, _r(O.APPLIED)), (0, _r(O.EVICTED))])[0]["outcome"] == "EVICTED"
    assert push_results([(0, _r(O.DUPLICATE)), (0, _r(O.BUFFERED))])[0]["outcome"] == "DUPLICATE"
    assert push_results([(0, _r(O.BUFFERED)), (0, _r(O.BUFFERED))])[0]["outcome"] == "BUFFERED"


# -- pull answers: every slice asked for, each once, or nothing is installed ------------------------

def _plan():
    return make_plan([ParamSpec("w", (10,)), ParamSpec("big", (1000,))], num_shards=2, partition_bytes=1024)


def _answer(plan, shard, values, leave_out=()):
    """A shard's crafted pull answer: every slice of `shard` from `values`, except `leave_out`."""
    flat = plan.split(values)
    frames = [dense_frame(s.key, flat[s.key]) for s in plan.slices_for(shard) if s.key not in leave_out]
    return wire.read_pull_response(wire.pull_response_frame(3, 0, frames).tobytes())


def _pull(plan, answers, into=None):
    pulled = Pulled(plan, ["s0", "s1"], None, into)
    for shard, resp in answers:
        pulled.absorb(shard, resp)
    return pulled.finish()


VALUES = {"w": torch.arange(10.0), "big": torch.arange(1000.0) + 100}


def test_a_complete_pull_answer_is_installed():
    plan = _plan()
    assert len(plan.slices_of("big")) > 1 and all(plan.slices_for(k) for k in range(2))  # split over both shards
    got = _pull(plan, [(k, _answer(plan, k, VALUES)) for k in range(2)])
    assert all(torch.equal(got[n], VALUES[n]) for n in VALUES)


@pytest.mark.parametrize("into", [None, "float32", "float64"], ids=["no destination", "decoded in place", "copied"])
def test_a_pull_answer_missing_a_slice_is_refused_and_no_unsent_value_reaches_the_model(into):
    plan = _plan()
    missing = plan.slices_of("big")[-1]
    model = None if into is None else {n: torch.full(t.shape, -7.0, dtype=getattr(torch, into)) for n, t in VALUES.items()}
    answers = [(k, _answer(plan, k, VALUES, leave_out={missing.key})) for k in range(2)]
    with pytest.raises(InvalidArgument, match="lack 1 slices"):
        _pull(plan, answers, model)
    if model is not None:  # each element holds what it held or what was sent, never uninitialised memory
        for n, t in model.items():
            assert bool(((t == -7.0) | (t == VALUES[n].to(t.dtype))).all()), n
        tail = model["big"].view(-1)[missing.start:missing.start + missing.length]
        assert bool((tail == -7.0).all())  # the slice nobody sent was left alone


def test_a_pull_answer_with_a_slice_not_asked_for_or_sent_twice_is_refused():
    plan = _plan()
    pulled = Pulled(plan, ["s0", "s1"], ["w"], None)
    other = next(s for s in plan.slices_of("big"))
    with pytest.raises(InvalidArgument, match="not asked for"):
        pulled.absorb(other.shard, _answer(plan, other.shard, VALUES, leave_out={
            s.key for s in plan.slices_for(other.shard) if s.key != other.key}))
    w = plan.slices_of("w")[0]
    twice = wire.read_pull_response(wire.pull_response_frame(3, 0, [dense_frame(w.key, VALUES["w"])] * 2).tobytes())
    with pytest.raises(InvalidArgument, match="sent it twice"):
        Pulled(plan, ["s0", "s1"], ["w"], None).absorb(w.shard, twice)
