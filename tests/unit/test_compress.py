import pytest
import torch

from ps.compress import Compressor, parse
from ps.errors import InvalidArgument


@pytest.mark.parametrize("spec, want", [("none", ("none", 0.0)), ("bf16", ("bf16", 0.0)), ("topk:0.01", ("topk", 0.01)),
                                        ("topk:1", ("topk", 1.0))])
def test_specs_parse(spec, want):
    assert parse(spec) == want


@pytest.mark.parametrize("spec", ["int8", "topk", "topk:0", "topk:1.5", "topk:nan", "topk:x", "topk:-0.1", ""])
def test_bad_specs_are_refused_with_the_rule(spec):
    with pytest.raises(InvalidArgument, match=r"topk:R with 0 < R <= 1"):
        parse(spec)


def test_topk_sends_the_largest_entries_and_keeps_the_rest():
    c = Compressor("topk:0.25")
    idx, values = c.sparsify("k", torch.tensor([1.0, -4, 2, 0.5, 3, 0, 0, 1]))
    assert sorted(idx.tolist()) == [1, 4] and sorted(values.tolist()) == [-4.0, 3.0]
    assert torch.equal(c.residual["k"], torch.tensor([1.0, 0, 2, 0.5, 0, 0, 0, 1]))


def test_error_feedback_loses_nothing_over_steps():
    """Whatever was not sent is still owed: sent so far + residual == sum of all gradients."""
    torch.manual_seed(0)
    c = Compressor("topk:0.1")
    sent, total = torch.zeros(1000, dtype=torch.float64), torch.zeros(1000, dtype=torch.float64)
    for _ in range(20):
        g = torch.randint(-8, 8, (1000,)).float()  # small integers: every sum is exact
        idx, values = c.sparsify("k", g)
        assert len(idx) == 100
        sent.index_add_(0, idx.long(), values.double())
        total += g.double()
    assert torch.equal(sent + c.residual["k"].double(), total)


def test_keep_is_at_least_one_and_at_most_the_length():
    c = Compressor("topk:0.001")
    assert c.keep(10) == 1
    assert Compressor("topk:1").keep(7) == 7


def test_fp16_sends_a_slice_that_would_overflow_in_bf16():
    c = Compressor("fp16")
    assert c.to_wire(torch.tensor([1.0, 65504.0])).dtype == torch.float16
    big = torch.tensor([1.0, 1e5])
    assert c.to_wire(big).dtype == torch.bfloat16 and torch.isfinite(c.to_wire(big)).all()
    assert c.to_wire(torch.tensor([1.0, float("inf")])).dtype == torch.float16  # the servers refuse it either way
    assert Compressor("bf16").to_wire(big).dtype == torch.bfloat16  # bf16 has fp32's range


def test_restore_owes_what_was_sent_again():
    c = Compressor("topk:0.5")
    g = torch.tensor([4.0, 3.0, 2.0, 1.0])
    c.sparsify("k", g)
    c.restore(["k"])
    assert torch.equal(c.residual["k"], g) and not c.sent
    c.sparsify("k", torch.zeros(4))
    c.settled()
    c.restore(["k"])  # settled: nothing to give back
    assert torch.equal(c.residual["k"], torch.tensor([0.0, 0, 2, 1]))
