"""The clicks data set, dlrm-tiny, binary metrics (AUC against a pairwise count), and ps-compare's
AUC target and hybrid configurations."""

import itertools
import math
import time

import numpy as np
import pytest
import torch
from torch import nn

from ps import data as ps_data
from ps.cli.compare import build_parser, config_from_args
from ps.compare.report import reached, summarize, table
from ps.compare.runner import RunResult, check_runs
from ps.compare.spec import CompareConfig, RunSpec, parse_runs
from ps.data import auc, binary_metrics, eval_metrics, evaluate, load_data, logloss
from ps.data.clicks import CATEGORICAL, DENSE, VOCAB, clicks, feature_ids, generate, hidden_logits
from ps.embedding import server_tables
from ps.errors import InvalidArgument
from ps.models import build_model

CPU = torch.device("cpu")


# -- the data -------------------------------------------------------------------------------------
def test_clicks_is_the_same_log_every_time_with_the_documented_shape():
    start = time.perf_counter()
    a = load_data("clicks")
    assert time.perf_counter() - start < 2.0
    b = clicks()
    assert a.input_shape == (DENSE + CATEGORICAL,) and a.num_classes == 1
    (xa, ya), (xb, yb) = a.train.tensors, b.train.tensors
    assert xa.shape == (100_000, 8) and xa.dtype == torch.float64 and ya.dtype == torch.float32
    assert len(a.test) == 20_000
    assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(a.test.tensors[0], b.test.tensors[0])
    assert set(ya.unique().tolist()) == {0.0, 1.0} and 0.2 < float(ya.mean()) < 0.45
    ids = xa[:, DENSE:]
    assert torch.equal(ids, ids.round()) and float(ids.min()) >= 0 and float(ids.max()) < 2 ** 53
    assert float(ids.max()) > 2 ** 40  # hashed ids spread over a large range, not 0..VOCAB-1


def test_ids_are_zipf_over_a_million_values_per_feature_and_features_do_not_share_ids():
    x, _ = generate(50_000, seed=1)
    ids = x[:, DENSE:].astype(np.int64)
    rank1 = feature_ids(np.array([1, 2]), 0)
    share = [(ids[:, 0] == rank1[k]).mean() for k in range(2)]
    harmonic = (np.arange(1, VOCAB + 1, dtype=np.float64) ** -1.1).sum()
    assert share[0] == pytest.approx(1 / harmonic, rel=0.1) and share[1] == pytest.approx(2 ** -1.1 / harmonic, rel=0.1)
    assert len(np.unique(ids[:, 0])) > 10_000  # a long tail
    per_feature = [set(ids[:, f].tolist()) for f in range(CATEGORICAL)]
    assert all(not (a & b) for a, b in itertools.combinations(per_feature, 2))


def test_the_labels_follow_the_hidden_model():
    x, y = generate(20_000)
    assert auc(hidden_logits(x), y) > 0.8
    assert abs(auc(x[:, DENSE + 3], y) - 0.5) < 0.03  # an id's hash value itself says nothing


# -- metrics ----------------------------------------------------------------------------------------
def pairwise_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_pairwise_count_ties_included(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 200))
    scores = rng.integers(0, 6, n).astype(np.float64)  # many ties
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    assert auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)
    distinct = scores + rng.random(n)  # no ties
    assert auc(distinct, labels) == pytest.approx(pairwise_auc(distinct, labels), abs=1e-12)


def test_auc_edge_cases():
    assert auc([0.1, 0.2, 0.9], [0, 0, 1]) == 1.0
    assert auc([0.9, 0.2, 0.1], [0, 0, 1]) == 0.0
    assert auc([3.0, 3.0, 3.0, 3.0], [0, 1, 0, 1]) == 0.5
    assert auc([-math.inf, math.inf, math.inf], [0, 1, 0]) == 0.75
    assert math.isnan(auc([0.1, 0.2], [1, 1])) and math.isnan(auc([math.nan, 0.2], [0, 1]))
    with pytest.raises(InvalidArgument, match="one label per score"):
        auc([0.1, 0.2], [1])


def test_logloss_is_binary_cross_entropy_and_stable_for_large_logits():
    z, y = torch.tensor([-3.0, 0.0, 2.5, 40.0, -40.0]), torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0])
    assert logloss(z.numpy(), y.numpy()) == pytest.approx(
        float(nn.functional.binary_cross_entropy_with_logits(z.double(), y.double())), rel=1e-12)


class Logit(nn.Module):
    """One logit per sample: x[:, 0] - 0.5, shaped [B] or [B, 1]."""

    def __init__(self, column: bool):
        super().__init__()
        self.column = column

    def forward(self, x):
        out = x[:, 0] - 0.5
        return out.unsqueeze(1) if self.column else out


@pytest.mark.parametrize("column", [False, True])
def test_a_binary_model_is_scored_by_the_sign_of_its_logit_with_bce(column):
    x = torch.tensor([[0.9], [0.2], [0.7], [0.1], [0.6]])
    y = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0])
    dataset = torch.utils.data.TensorDataset(x, y)
    acc, loss = evaluate(Logit(column), dataset, CPU, batch_size=2)
    assert acc == pytest.approx(4 / 5)
    logits = (x[:, 0] - 0.5).double()
    assert loss == pytest.approx(float(nn.functional.binary_cross_entropy_with_logits(logits, y.double())), rel=1e-6)
    metrics = binary_metrics(Logit(column), dataset, CPU, batch_size=2)
    assert metrics["auc"] == pytest.approx(pairwise_auc(logits.tolist(), y.tolist()))
    assert metrics["logloss"] == pytest.approx(loss, rel=1e-6)
    assert ps_data.test_metrics(Logit(column), dataset, CPU) == {
        "test_accuracy": pytest.approx(0.8), "test_auc": metrics["auc"], "test_logloss": metrics["logloss"]}


def test_a_classifier_gets_test_accuracy_only_and_no_binary_metrics():
    d = ps_data.synthetic(num_samples=64, features=4, num_classes=3)
    model = nn.Sequential(nn.Linear(4, 3))
    assert set(ps_data.test_metrics(model, d.test, CPU)) == {"test_accuracy"}
    assert set(eval_metrics(model, d.test, CPU)) == {"accuracy", "loss"}
    with pytest.raises(InvalidArgument, match="one logit per sample"):
        binary_metrics(model, d.test, CPU)


# -- dlrm-tiny --------------------------------------------------------------------------------------
def test_dlrm_tiny_declares_one_server_table_per_feature_and_refuses_other_data():
    d = load_data("clicks")
    model = build_model("dlrm-tiny", d.input_shape, d.num_classes)
    assert sorted(server_tables(model)) == ["cat0", "cat1", "cat2", "cat3"]
    assert {t.spec.dim for t in server_tables(model).values()} == {16}
    with pytest.raises(InvalidArgument, match="num_classes"):
        build_model("dlrm-tiny", (8,), 2)
    with pytest.raises(InvalidArgument, match="input_shape"):
        build_model("dlrm-tiny", (1, 8, 8), 1)
    with pytest.raises(InvalidArgument, match="not bound"):
        model(d.test.tensors[0][:4])


# -- ps-compare -------------------------------------------------------------------------------------
def test_hybrid_configurations_map_to_the_servers_table_flags():
    runs = parse_runs("sync+tables=async,sync+tables=ssp:2,ssp:1+tables=ssp:3+slr,async+tables=sync", 2)
    assert runs[0] == RunSpec("sync+tables=async", "sync", table_mode="async")
    assert [r.server_flags() for r in runs] == [
        ["--table-mode", "async"], ["--table-mode", "ssp", "--table-staleness", "2"],
        ["--table-mode", "ssp", "--table-staleness", "3"], ["--table-mode", "sync"]]
    assert runs[2].staleness == 1 and runs[2].staleness_lr
    assert parse_runs("sync", 2)[0].server_flags() == []


@pytest.mark.parametrize("text, rule", [
    ("sync+tables=sync", r"option \+tables=sync is the dense mode already"),
    ("ssp:2+tables=ssp:2", "is the dense mode already"),
    ("sync+tables=fast", r"option \+tables=fast must name the tables' mode: tables=sync, tables=async or tables=ssp:S"),
    ("sync+tables=ssp", "must name the tables' mode"),
    ("sync+tables", r"option \+tables needs the tables' mode"),
    ("sync+tables=async+tables=ssp:1", "is given twice"),
    ("allreduce+tables=async", r"option \+tables=async does not apply to allreduce"),
    ("sync+backup=x", "needs a whole number of backup workers"),
    ("sync+tables=Async", r"must look like .*\+tables=MODE"),
])
def test_bad_hybrid_configurations_name_the_value_and_the_rule(text, rule):
    with pytest.raises(InvalidArgument, match=rule) as e:
        parse_runs(text, 4)
    assert repr(text) in str(e.value)


def test_configurations_the_model_cannot_run_are_refused_before_any_runs():
    with pytest.raises(InvalidArgument, match="leave allreduce out"):
        check_runs(CompareConfig(runs=tuple(parse_runs("sync,allreduce", 2)), model="dlrm-tiny", data="clicks"))
    with pytest.raises(InvalidArgument, match="model mlp has none"):
        check_runs(CompareConfig(runs=tuple(parse_runs("sync+tables=async", 2)), data="synthetic"))
    check_runs(CompareConfig(runs=tuple(parse_runs("sync,sync+tables=async", 2)), model="dlrm-tiny", data="clicks"))


def test_target_auc_is_a_flag_checked_in_its_range():
    cfg = config_from_args(build_parser({}).parse_args(["--modes", "sync", "--target-auc", "0.7"]))
    assert cfg.target_auc == 0.7
    for bad in (0.5, 1.2):
        with pytest.raises(InvalidArgument, match=r"target_auc \(.*\) must be in \(0.5, 1\]"):
            CompareConfig(runs=(RunSpec("sync", "sync"),), target_auc=bad)


def test_the_report_shows_time_to_target_auc_and_final_auc_and_logloss_for_a_binary_job():
    cfg = CompareConfig(runs=(RunSpec("sync", "sync"),), target_auc=0.7)
    curve = [{"time": 0.0, "step": 0, "version": 0, "accuracy": 0.69, "loss": 0.67, "auc": 0.5, "logloss": 0.67},
             {"time": 1.5, "step": 40, "version": 40, "accuracy": 0.70, "loss": 0.56, "auc": 0.71, "logloss": 0.56},
             {"time": 3.0, "step": 80, "version": 80, "accuracy": 0.72, "loss": 0.53, "auc": 0.75, "logloss": 0.53}]
    row = summarize(RunResult(RunSpec("sync", "sync"), None, curve, train_time=3.0, updates=80), cfg)
    assert row["time_to_target"] == 1.5 and row["steps_to_target"] == 40
    assert row["final_auc"] == 0.75 and row["final_logloss"] == 0.53
    text = table([row])
    assert "| config | status | time to target (s) | steps to target | final AUC | final logloss | final accuracy |" in text
    assert "| sync | ok | 1.5000 | 40 | 0.7500 | 0.5300 | 0.7200 |" in text
    assert not reached({"accuracy": 0.9, "loss": 0.1}, cfg)  # no AUC measured: never reached
    classifier = table([summarize(RunResult(RunSpec("sync", "sync"), None, [
        {"time": 0.0, "step": 0, "version": 0, "accuracy": 0.5, "loss": 1.0}]), CompareConfig(runs=cfg.runs))])
    assert "AUC" not in classifier and "final loss" in classifier
