"""ps-compare's weight comparison: the largest difference of any final weight from the all-reduce
run's, read from the safetensors files the runs write."""

import pytest
import torch
from safetensors.torch import save_file

from ps.compare.report import COLUMNS, compare_weights, summarize, table, weight_gap
from ps.compare.runner import RunResult
from ps.compare.spec import CompareConfig, RunSpec


def _weights(path, **tensors):
    save_file(tensors, str(path))
    return str(path)


def test_the_gap_is_the_largest_difference_of_any_weight_and_zero_for_equal_weights(tmp_path):
    a = _weights(tmp_path / "a", w=torch.tensor([1.0, 2.0, 3.0]), b=torch.tensor([0.5]))
    b = _weights(tmp_path / "b", w=torch.tensor([1.0, 2.0, 3.0]), b=torch.tensor([0.5]))
    c = _weights(tmp_path / "c", w=torch.tensor([1.0, 2.25, 3.0]), b=torch.tensor([0.5 - 2 ** -20]))
    assert weight_gap(a, b) == 0.0
    assert weight_gap(a, c) == 0.25
    d = _weights(tmp_path / "d", w=torch.tensor([1.0, 2.0, 3.0]), b=torch.tensor([0.5 + 2 ** -23]))
    assert weight_gap(a, d) == 2 ** -23  # one unit in the last place is seen, not rounded away


def test_runs_holding_different_parameters_are_not_compared(tmp_path):
    a = _weights(tmp_path / "a", w=torch.zeros(3))
    with pytest.raises(ValueError, match="different parameters"):
        weight_gap(a, _weights(tmp_path / "b", v=torch.zeros(3)))
    with pytest.raises(ValueError, match="different parameters"):
        weight_gap(a, _weights(tmp_path / "c", w=torch.zeros(4)))


def test_each_row_gets_its_gap_from_the_all_reduce_run_and_the_table_shows_it(tmp_path):
    cfg = CompareConfig(runs=(RunSpec("sync", "sync"), RunSpec("async", "async"), RunSpec("allreduce", "allreduce")))
    base = torch.linspace(-1, 1, 7)
    results = [RunResult(RunSpec("sync", "sync"), weights=_weights(tmp_path / "s", w=base + 3e-7)),
               RunResult(RunSpec("async", "async"), weights=None),  # a run that wrote none
               RunResult(RunSpec("allreduce", "allreduce"), weights=_weights(tmp_path / "r", w=base))]
    rows = [summarize(r, cfg) for r in results]
    compare_weights(results, rows)
    assert rows[0]["weights_vs_allreduce"] == pytest.approx(3e-7, rel=0.2)
    assert rows[1]["weights_vs_allreduce"] is None and rows[2]["weights_vs_allreduce"] == 0.0
    assert table(rows).splitlines()[2].endswith(f"| {rows[0]['weights_vs_allreduce']:.1e} |")  # not 0.0000
    without = [summarize(r, cfg) for r in results[:2]]
    compare_weights(results[:2], without)  # no all-reduce run: nothing to compare with
    assert [r["weights_vs_allreduce"] for r in without] == [None, None]


def test_a_time_to_target_reached_at_the_first_sample_reads_as_zero_not_in_scientific_notation():
    row = {key: None for key, _ in COLUMNS}
    row.update(config="sync", status="ok", time_to_target=3e-5, steps_to_target=0.0, final_loss=2.1e-4,
               weights_vs_allreduce=2e-7)
    line = table([row]).splitlines()[2]
    assert line.startswith("| sync | ok | 0.0000 | 0.0000 |")
    assert "| 2.1e-04 |" in line and line.endswith("| 2.0e-07 |")
