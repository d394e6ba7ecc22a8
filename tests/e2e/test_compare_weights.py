"""ps-compare compares final weights, not only accuracy: sync ends on the all-reduce baseline's
weights to float rounding, async does not, and the report's number is the saved files' difference."""

import json
import subprocess
import sys

import pytest

from ps.compare.report import weight_gap


@pytest.mark.slow
def test_sync_ends_on_the_all_reduce_weights_to_rounding_and_async_does_not(tmp_path):
    run = subprocess.run([sys.executable, "-m", "ps.cli.compare", "--out", str(tmp_path), "--modes", "sync,async,allreduce",
                          "--workers", "2", "--servers", "2", "--data", "synthetic", "--steps", "40",
                          "--eval-interval", "0.2"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {r["config"]: r for r in json.loads((tmp_path / "results.json").read_text())["summary"]}
    gaps = {label: row["weights_vs_allreduce"] for label, row in rows.items()}
    base = tmp_path / "logs" / "allreduce" / "final-weights.safetensors"
    for label in gaps:  # the reported gap is the difference of the weights each run saved
        assert gaps[label] == weight_gap(str(tmp_path / "logs" / label / "final-weights.safetensors"), str(base))
    assert gaps["allreduce"] == 0.0
    assert gaps["sync"] < 1e-5, gaps  # the same SGD steps, the gradients summed in another order
    assert gaps["async"] > 1e-3, gaps  # other steps: the comparison tells them apart
    assert "max weight diff from allreduce" in (tmp_path / "report.md").read_text()
