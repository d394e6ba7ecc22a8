"""A worker killed with SIGKILL in sync mode does not hang the others: after the timeout it is
evicted and the steps complete without it."""

import json
import os
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


def test_a_killed_worker_is_evicted_and_sync_training_completes(cluster, tmp_path):
    with cluster(2, "sync", num_workers=2, worker_timeout=2.0) as addresses:
        survivor = start_worker(addresses, 0, tmp_path)
        victim = start_worker(addresses, 1, tmp_path)
        deadline = time.monotonic() + 60
        while steps_logged(tmp_path / "worker-1.jsonl") < 20:
            assert time.monotonic() < deadline, "the victim never got going"
            assert victim.poll() is None, victim.stdout.read()
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        killed_at = steps_logged(tmp_path / "worker-1.jsonl")
        out, _ = survivor.communicate(timeout=120)
        assert survivor.returncode == 0, out
        with PSClient(addresses, heartbeat=False) as c:
            stats = c.stats()
    victim.wait()
    assert killed_at < STEPS
    assert all(s["evictions"] == 1 for s in stats), [(s["evictions"], s["dropped"], s["pushes"]) for s in stats]
    assert all(s["version"] == STEPS for s in stats)
    records = [json.loads(x) for x in (tmp_path / "worker-0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "final" not in r] == list(range(STEPS))
