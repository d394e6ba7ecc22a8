"""The client's push/pull encoding: which part's outcome stands for a shard's push."""

from ps.proto import ps_pb2 as pb
from ps.worker.codec import push_results

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
