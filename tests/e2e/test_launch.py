"""ps-launch end to end: real server and worker processes on loopback."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ACCURACY = re.compile(r"^final test accuracy: ([0-9.]+)$", re.M)


def launch(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ps.cli.launch", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_two_servers_two_workers_reach_093_on_digits_with_the_mlp(mode, tmp_path):
    run = launch("--servers", "2", "--workers", "2", "--mode", mode, "--model", "mlp", "--data", "digits",
                 "--log-dir", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    accuracy = float(ACCURACY.search(run.stdout).group(1))
    assert accuracy >= 0.93, run.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker-0.jsonl", "worker-1.jsonl"]


@pytest.mark.slow
def test_a_user_model_and_dataset_train_through_the_plugin_flags():
    run = launch("--servers", "1", "--workers", "2", "--mode", "async", "--steps", "60",
                 "--model", "tests.e2e.user_plugin:make_model", "--data", "tests.e2e.user_plugin:make_data")
    assert run.returncode == 0, run.stdout + run.stderr
    assert float(ACCURACY.search(run.stdout).group(1)) >= 0.9


def test_a_failing_worker_fails_the_launch():
    run = launch("--servers", "1", "--workers", "1", "--model", "tests.e2e.user_plugin:make_failing_model",
                 "--data", "tests.e2e.user_plugin:make_data", "--steps", "5")
    assert run.returncode == 1
    assert "worker-0 exited with code 1" in run.stdout
    assert "this model fails in its first step" in run.stdout


JOB = """
import os

import torch

from ps.data import synthetic


def model(input_shape, num_classes):
    if "LOCAL_RANK" in os.environ:  # a worker: record the index ps-launch gave it
        with open(f"local-rank-{os.environ['LOCAL_RANK']}", "w") as f:
            f.write(str(os.getpid()))
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], num_classes))


def data():
    return synthetic(num_samples=256, features=4, num_classes=2)
"""


def test_the_readme_plugin_command_works_from_the_directory_holding_the_package_and_each_worker_gets_its_local_rank(
        tmp_path):
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "job.py").write_text(JOB)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LOCAL_RANK")}
    run = subprocess.run([Path(sys.executable).parent / "ps-launch", "--model", "mypkg.job:model",
                          "--data", "mypkg.job:data", "--servers", "1", "--workers", "2", "--steps", "5"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert ACCURACY.search(run.stdout), run.stdout
    recorded = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("local-rank-"))
    assert recorded == ["local-rank-0", "local-rank-1"]
    pids = {(tmp_path / name).read_text() for name in recorded}
    assert len(pids) == 2  # two worker processes, each with its own index


@pytest.mark.slow
@pytest.mark.parametrize("compress", ["bf16", "topk:0.1"])
def test_compressed_gradients_on_the_wire_still_reach_093_on_digits(compress):
    run = launch("--servers", "2", "--workers", "2", "--mode", "async", "--compress", compress)
    assert run.returncode == 0, run.stdout + run.stderr
    assert float(ACCURACY.search(run.stdout).group(1)) >= 0.93, run.stdout
