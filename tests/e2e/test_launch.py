"""ps-launch end to end: real server and worker processes on loopback."""

import re
import subprocess
import sys

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
    run = launch("--servers", "1", "--workers", "1", "--model", "no_such_module:factory", "--steps", "5")
    assert run.returncode == 1
    assert "worker-0 exited with code 2" in run.stdout
    assert "cannot import 'no_such_module'" in run.stdout


@pytest.mark.slow
@pytest.mark.parametrize("compress", ["bf16", "topk:0.1"])
def test_compressed_gradients_on_the_wire_still_reach_093_on_digits(compress):
    run = launch("--servers", "2", "--workers", "2", "--mode", "async", "--compress", compress)
    assert run.returncode == 0, run.stdout + run.stderr
    assert float(ACCURACY.search(run.stdout).group(1)) >= 0.93, run.stdout
