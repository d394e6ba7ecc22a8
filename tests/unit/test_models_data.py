import pytest
import torch

from torch.utils.data import Dataset, TensorDataset

from ps.data import accuracy, batches, digits, load_data, loader, shard_indices, steps_per_epoch, synthetic
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


def sample_by_sample(dataset, indices, batch_size, seed):
    """The batching that loader replaced, kept as the oracle: each batch a stack of its samples."""
    gen = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    while True:
        if len(pending) < batch_size:
            pending += [indices[i] for i in torch.randperm(len(indices), generator=gen).tolist()]
        take, pending = pending[:batch_size], pending[batch_size:]
        xs, ys = zip(*(dataset[i] for i in take))
        yield torch.stack(xs), torch.stack([torch.as_tensor(t) for t in ys])


class Squares(Dataset):
    """A map-style dataset of (tensor, Python int) samples; importable, so spawned workers can read it."""

    def __len__(self):
        return 45

    def __getitem__(self, i):
        return torch.full((2, 3), float(i * i)), i % 7


def same_batches(a, b, steps):
    for _ in range(steps):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert xa.dtype == xb.dtype and ya.dtype == yb.dtype and xa.shape == xb.shape and ya.shape == yb.shape
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("make", [lambda: synthetic(num_samples=50).train, Squares], ids=["tensors", "map-style"])
def test_loader_gives_the_sample_by_sample_batches_over_epochs_with_a_remainder(make, workers):
    data = make()
    idx = shard_indices(len(data), 1, 3)  # 13 or 15 samples in batches of 4: each epoch leaves a remainder
    before = torch.random.get_rng_state()
    stream = loader(data, idx, 4, 11, workers=workers, pin_memory=False)
    same_batches(stream, sample_by_sample(data, idx, 4, 11), 5 * len(idx) // 4 + 1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG (model init, dropout) untouched


def test_loader_batch_larger_than_the_shard_takes_what_one_epoch_adds():
    data = Squares()
    same_batches(loader(data, [3, 5, 8], 7, 2), sample_by_sample(data, [3, 5, 8], 7, 2), 4)


def test_loader_dtypes_follow_the_samples():
    x, y = next(loader(Squares(), list(range(45)), 5, 0))
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (5, 2, 3)
    data = TensorDataset(torch.arange(20, dtype=torch.float64).view(10, 2), torch.arange(10, dtype=torch.int32))
    x, y = next(loader(data, list(range(10)), 3, 0))
    assert x.dtype == torch.float64 and y.dtype == torch.int32


def test_loader_orders_differ_per_seed_and_batches_is_the_in_process_loader():
    data = synthetic(num_samples=200).train
    idx = list(range(len(data)))
    first = [next(loader(data, idx, 8, seed))[1].tolist() for seed in (0, 1, 0)]
    assert first[0] != first[1] and first[0] == first[2]
    same_batches(batches(data, idx, 8, 5), loader(data, idx, 8, 5), 3)


def test_loader_refuses_what_would_never_yield():
    with pytest.raises(InvalidArgument, match="indices"):
        loader(Squares(), [], 4, 0)
    with pytest.raises(InvalidArgument, match="workers"):
        loader(Squares(), [1], 4, 0, workers=-1)


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
