import pytest
import torch

from ps.data import accuracy, batches, digits, load_data, shard_indices, steps_per_epoch, synthetic
from ps.errors import InvalidArgument
from ps.models import build_model, model_loss
from ps.plugins import load_object


def test_digits_ships_offline_with_a_fixed_split():
    a, b = digits(), digits()
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 359
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert float(a.train.tensors[0].max()) <= 1.0


@pytest.mark.parametrize("name, data", [("mlp", "digits"), ("cnn", "digits"), ("mlp", "synthetic")])
def test_builtin_models_fit_builtin_data(name, data):
    d = load_data(data)
    model = build_model(name, d.input_shape, d.num_classes)
    x, y = next(batches(d.train, list(range(len(d.train))), 8, 0))
    out = model(x)
    assert out.shape == (8, d.num_classes)
    model_loss(model, out, y).backward()


def test_a_cnn_refuses_inputs_that_are_not_images():
    with pytest.raises(InvalidArgument, match="cnn needs images"):
        build_model("cnn", synthetic().input_shape, 10)


def test_worker_shards_are_disjoint_and_cover_the_data():
    shards = [shard_indices(101, r, 4) for r in range(4)]
    assert sorted(sum(shards, [])) == list(range(101))
    assert steps_per_epoch(101, 4, 10) == 3


def test_batches_are_deterministic_per_seed_and_cycle_through_the_shard():
    d = synthetic(num_samples=50)
    idx = shard_indices(len(d.train), 0, 2)
    a = [y.tolist() for _, y in (next(it) for it in [batches(d.train, idx, 7, 3)] * 10)]
    b = [y.tolist() for _, y in (next(it) for it in [batches(d.train, idx, 7, 3)] * 10)]
    assert a == b


def test_accuracy_of_a_perfect_model_is_one():
    d = synthetic(num_samples=40)

    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(self.y[: len(x)], 10).float()

    oracle = Oracle()
    oracle.y = d.test.tensors[1]
    assert accuracy(oracle, d.test, torch.device("cpu"), batch_size=len(d.test)) == 1.0


@pytest.mark.parametrize("spec, rule", [
    ("nocolon", "package.module:factory"),
    ("no_such_mod:f", "cannot import"),
    ("ps.models:nothing_here", "has no attribute"),
])
def test_plugin_specs_give_clear_errors(spec, rule):
    with pytest.raises(InvalidArgument, match=rule):
        load_object(spec)


def test_unknown_builtin_names_are_refused():
    with pytest.raises(InvalidArgument, match="model"):
        build_model("resnet", (1, 8, 8), 10)
    with pytest.raises(InvalidArgument, match="data"):
        load_data("mnist")
