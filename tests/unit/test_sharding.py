import pytest
import torch

from ps.errors import InvalidArgument
from ps.sharding import ParamSpec, make_plan, specs_from_module

MiB = 1 << 20


def specs():
    return [ParamSpec("big", (1000, 3000), "float32"), ParamSpec("mid", (500, 500), "float32"),
            ParamSpec("bias", (7,), "float32"), ParamSpec("half", (2048, 1024), "float16")]


def test_plan_is_deterministic_and_fingerprints_agree():
    a, b = make_plan(specs(), 3, 4 * MiB), make_plan(specs(), 3, 4 * MiB)
    assert a.slices == b.slices and a.fingerprint == b.fingerprint


@pytest.mark.parametrize("change", [
    lambda s: (s[:-1], 3, 4 * MiB),
    lambda s: (s, 2, 4 * MiB),
    lambda s: (s, 3, 2 * MiB),
    lambda s: ([ParamSpec("big", (1000, 3001))] + s[1:], 3, 4 * MiB),
    lambda s: (s[:3] + [ParamSpec("half", (2048, 1024), "bfloat16")], 3, 4 * MiB),
])
def test_fingerprint_changes_with_names_shapes_dtypes_servers_or_partition(change):
    assert make_plan(*change(specs())).fingerprint != make_plan(specs(), 3, 4 * MiB).fingerprint


def test_large_tensors_are_split_into_slices_no_larger_than_the_partition():
    plan = make_plan(specs(), 3, 4 * MiB)
    big = [s for s in plan.slices if s.name == "big"]
    assert len(big) == 3 and sum(s.length for s in big) == 3_000_000
    assert all(s.length * 4 <= 4 * MiB for s in big)
    assert [s.start for s in big] == [0, 1_000_000, 2_000_000]


def test_placement_is_balanced_within_one_slice():
    plan = make_plan([ParamSpec(f"p{i}", (1 << 18,)) for i in range(10)], 4, 4 * MiB)
    loads = plan.shard_bytes()
    assert max(loads) - min(loads) <= (1 << 20)


def test_split_then_assemble_is_exact_for_every_dtype():
    torch.manual_seed(0)
    tensors = {s.name: torch.randn(s.shape).to(getattr(torch, s.dtype)) for s in specs()}
    plan = make_plan(specs(), 3, 1 * MiB)
    back = plan.assemble(plan.split(tensors))
    for name, t in tensors.items():
        assert torch.equal(back[name], t)


def test_bad_specs_are_refused_with_the_rule():
    with pytest.raises(InvalidArgument, match="unique"):
        make_plan([ParamSpec("a", (1,)), ParamSpec("a", (2,))], 1, 4 * MiB)
    with pytest.raises(InvalidArgument, match="num_shards"):
        make_plan(specs(), 0, 4 * MiB)
    with pytest.raises(InvalidArgument, match="partition_bytes"):
        make_plan(specs(), 1, 10)
    with pytest.raises(InvalidArgument, match="dtype"):
        ParamSpec("x", (1,), "int64")


def test_specs_come_from_trainable_parameters_in_order():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    assert [s.name for s in specs_from_module(model)] == ["0.weight", "1.weight", "1.bias"]
