"""A worker killed with SIGKILL does not hang the others in any mode (sync: after the timeout it
is evicted and the steps complete without it), and the same worker started again rejoins under
its id and finishes its steps."""

import json
import os

import pytest
import signal
import subprocess
import sys
import time

from ps.worker.client import PSClient

STEPS = 150


def start_worker(addresses, rank, log_dir):
    return subprocess.Popen(
        [sys.executable, "-m", "ps.cli.worker", "--servers", ",".join(addresses), "--rank", str(rank),
         "--num-workers", "2", "--steps", str(STEPS), "--data", "synthetic", "--log-dir", str(log_dir),
         "--eval-every", "0", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def steps_logged(path):
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip())


@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_a_killed_worker_is_evicted_the_others_complete_and_it_rejoins(cluster, tmp_path, mode):
    extra = {"staleness": 2} if mode == "ssp" else {}
    with cluster(2, mode, num_workers=2, worker_timeout=2.0, **extra) as addresses:
        survivor = start_worker(addresses, 0, tmp_path)
        victim = start_worker(addresses, 1, tmp_path)
        deadline = time.monotonic() + 60
        while steps_logged(tmp_path / "worker-1.jsonl") < 20:
            assert time.monotonic() < deadline, "the victim never got going"
            assert victim.poll() is None, victim.stdout.read()
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        killed_at = steps_logged(tmp_path / "worker-1.jsonl")
        out, _ = survivor.communicate(timeout=120)
        assert survivor.returncode == 0, out
        with PSClient(addresses, heartbeat=False) as c:  # async and ssp never waited: eviction may come later
            deadline = time.monotonic() + 15
            evicted = c.stats()
            while not all(s["evictions"] for s in evicted) and time.monotonic() < deadline:
                time.sleep(0.1)
                evicted = c.stats()
        again = start_worker(addresses, 1, tmp_path)  # the same id: it rejoins where it was
        out, _ = again.communicate(timeout=120)
        assert again.returncode == 0, out
        with PSClient(addresses, heartbeat=False) as c:
            stats = c.stats()
    assert killed_at < STEPS
    # Each server evicts the killed worker once, and no one else, then or after it rejoined and left.
    assert [s["evictions"] for s in evicted] == [1, 1], [(s["evictions"], s["dropped"], s["pushes"]) for s in evicted]
    assert [s["evictions"] for s in stats] == [1, 1], [(s["evictions"], s["dropped"], s["pushes"]) for s in stats]
    records = [json.loads(x) for x in (tmp_path / "worker-0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "final" not in r] == list(range(STEPS))
    rejoined = [json.loads(x) for x in (tmp_path / "worker-1.jsonl").read_text().splitlines()][killed_at:]
    steps = [r["step"] for r in rejoined if "final" not in r]
    if mode == "sync":  # it rejoins at the current step: here the survivor has already done them all
        assert steps == [] and all(s["version"] == STEPS for s in stats)
    else:  # it resumes from the clock the servers kept for it
        assert steps and steps[-1] == STEPS - 1 and killed_at - 2 <= steps[0] <= killed_at + 1, steps[:3]
