"""Every tensor-parallel layer and gpt-tiny, on 2 real ranks, against the unsharded model:
outputs and every gradient shard to 1e-5 (gloo on CPU; NCCL variants need 2 GPUs). The layers run
in float64 so that the tolerance tests the parallel algebra, not float32 summation order (in
float32 gpt-tiny's gradients differ by up to ~7e-5 relative, from the split sums alone)."""

import pytest
import torch

from ps.models.gpt import GPT
from ps.tp.groups import TPGroup
from ps.tp.layers import (ColumnParallelLinear, ParallelMLP, ParallelSelfAttention, RowParallelLinear,
                          VocabParallelEmbedding, partition_dims, shard_state)
from tests.tp.spawn import run_group

TOL = dict(rtol=1e-5, atol=1e-5)

LAYERS = {
    "column": (lambda tp: ColumnParallelLinear(16, 8, tp, gather_output=True), lambda: torch.randn(3, 5, 16)),
    "column-no-gather": (lambda tp: ColumnParallelLinear(16, 8, tp), lambda: torch.randn(3, 16)),
    "row": (lambda tp: RowParallelLinear(8, 6, tp, input_is_parallel=False), lambda: torch.randn(3, 5, 8)),
    "mlp": (lambda tp: ParallelMLP(16, 32, tp), lambda: torch.randn(2, 4, 16)),
    "attention": (lambda tp: ParallelSelfAttention(16, 4, tp), lambda: torch.randn(2, 6, 16)),
    "embedding": (lambda tp: VocabParallelEmbedding(12, 8, tp), lambda: torch.randint(0, 12, (3, 7))),
    "gpt-tiny": (lambda tp: GPT(vocab=16, seq_len=8, dim=16, layers=2, heads=4, tp=tp),
                 lambda: torch.randint(0, 16, (2, 8))),
}


def compare_on_rank(tp, name, device):
    build, make_input = LAYERS[name]
    torch.manual_seed(0)
    ref = build(TPGroup()).to(device, torch.float64)
    x = make_input().to(device)
    x = x.double() if x.is_floating_point() else x
    torch.manual_seed(1)
    sharded = build(tp).to(device, torch.float64)
    dims = partition_dims(ref)
    sharded.load_state_dict(shard_state(ref.state_dict(), dims, tp.rank, tp.size))
    want, got = ref(x), sharded(x)
    if name == "column-no-gather":  # each rank holds its slice of the output
        want = torch.chunk(want, tp.size, dim=-1)[tp.rank]
    torch.testing.assert_close(got, want, **TOL)
    probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device)
    (want * probe).sum().backward()
    (got * probe).sum().backward()
    ref_grads = shard_state({n: p.grad for n, p in ref.named_parameters()}, dims, tp.rank, tp.size)
    for n, p in sharded.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], **TOL, msg=lambda m: f"{name} {n}: {m}")


def _all_layers(tp, device_type):
    device = torch.device(device_type, tp.rank) if device_type == "cuda" else torch.device("cpu")
    for name in LAYERS:
        compare_on_rank(tp, name, device)


def test_every_tp_layer_and_gpt_tiny_match_the_unsharded_model_on_two_gloo_ranks():
    run_group(_all_layers, size=2, backend="gloo", args=("cpu",))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_every_tp_layer_and_gpt_tiny_match_the_unsharded_model_on_two_nccl_ranks():
    run_group(_all_layers, size=2, backend="nccl", args=("cuda",))


def test_a_group_of_one_is_the_unsharded_model():
    torch.manual_seed(0)
    a = GPT(vocab=16, seq_len=8, dim=16, heads=4)
    assert set(partition_dims(a)) >= {"tok.weight", "head.weight", "blocks.0.attn.qkv.weight"}
    assert "blocks.0.ln1.weight" not in partition_dims(a) and "blocks.0.mlp.fc2.bias" not in partition_dims(a)


def test_recompute_and_micro_batches_leave_the_gradients_unchanged():
    from ps.worker.trainer import _forward_backward

    torch.manual_seed(0)
    x, y = torch.randint(0, 16, (4, 8)), torch.randint(0, 16, (4, 8))
    grads = []
    for recompute, micro in ((False, 1), (True, 1), (False, 2), (True, 4)):
        torch.manual_seed(3)
        model = GPT(vocab=16, seq_len=8, dim=16, heads=4, recompute=recompute)
        _forward_backward(model, x, y, micro)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for other in grads[1:]:
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_sizes_that_do_not_divide_are_refused():
    from ps.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="heads"):
        ParallelSelfAttention(16, 3, TPGroup(0, 2))


def test_recompute_replays_the_same_dropout_masks():
    torch.manual_seed(0)
    x, y = torch.randint(0, 16, (4, 8)), torch.randint(0, 16, (4, 8))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(5)
        model = GPT(vocab=16, seq_len=8, dim=16, heads=4, dropout=0.3, recompute=recompute)
        model.loss(model(x), y).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_recompute_draws_fresh_dropout_masks_every_step():
    """Over several steps (forward, backward, update), recomputation changes nothing: each step's
    masks are new ones, the same as without recomputation (the replay must not rewind the RNG)."""
    torch.manual_seed(0)
    data = [(torch.randint(0, 16, (4, 8)), torch.randint(0, 16, (4, 8))) for _ in range(4)]
    runs = []
    for recompute in (False, True):
        torch.manual_seed(5)
        model = GPT(vocab=16, seq_len=8, dim=16, heads=4, layers=3, dropout=0.3, recompute=recompute)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        grads = []
        for x, y in data:
            opt.zero_grad()
            model.loss(model(x), y).backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            opt.step()
        runs.append(grads)
    for step, (plain, replayed) in enumerate(zip(*runs)):
        for n in plain:
            torch.testing.assert_close(replayed[n], plain[n], rtol=1e-5, atol=1e-6, msg=f"step {step}: {n}")
