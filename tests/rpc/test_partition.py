"""A network partition of one worker (a network namespace whose link is cut, or whose packets are
silently dropped) for longer than the lease timeout: the servers evict it, the other worker goes on, and when the link returns the
partitioned worker registers again and finishes; nothing deadlocks. Needs root and `ip netns`
(skipped otherwise)."""

import io
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from ps.cli.launch import start_servers, stop_all
from ps.worker.client import PSClient
from tests.netns import ip, usable, veth_namespace

STEPS = 400
HOST_IP, NS_IP = "10.231.0.1", "10.231.0.2"


@pytest.fixture
def netns():
    """A namespace joined to the host by a veth pair: (namespace name, the namespace's link name)."""
    with veth_namespace(HOST_IP, NS_IP) as pair:
        yield pair


def _worker(addresses, rank, log_dir, ns=None):
    argv = [sys.executable, "-m", "ps.cli.worker", "--servers", ",".join(addresses), "--rank", str(rank),
            "--num-workers", "2", "--steps", str(STEPS), "--data", "synthetic", "--log-dir", str(log_dir),
            "--eval-every", "0", "--no-progress"]
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.Popen(prefix + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _steps(path):
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0


def _cut(ns, ns_if, how, on):
    if how == "link":  # the link goes down: the worker's sends fail at once
        ip("-n", ns, "link", "set", ns_if, "down" if on else "up")
    else:  # packets vanish both ways: connections look alive until keepalive gives up on them
        for chain in ("INPUT", "OUTPUT"):
            subprocess.run(["ip", "netns", "exec", ns, "iptables", "-A" if on else "-D", chain, "-j", "DROP"],
                           check=True, capture_output=True)


@pytest.mark.slow
@pytest.mark.skipif(not usable(), reason="needs root and network namespaces")
@pytest.mark.parametrize("mode, how", [("sync", "link"), ("async", "link"), ("sync", "drop"), ("async", "drop")])
def test_a_partitioned_worker_is_evicted_then_rejoins_when_the_link_returns(netns, tmp_path, mode, how):
    if how == "drop" and shutil.which("iptables") is None:
        pytest.skip("needs iptables")
    ns, ns_if = netns
    log = io.StringIO()
    servers = start_servers(2, mode, 2, worker_timeout=1.5, host=HOST_IP, out=log)
    addresses = [s.address for s in servers]
    try:
        near = _worker(addresses, 0, tmp_path)
        far = _worker(addresses, 1, tmp_path, ns=ns)
        deadline = time.monotonic() + 90
        while _steps(tmp_path / "worker-1.jsonl") < 30:
            assert time.monotonic() < deadline and far.poll() is None, far.stdout.read() if far.poll() else ""
            time.sleep(0.05)
        _cut(ns, ns_if, how, on=True)  # the partition
        near_at_cut = _steps(tmp_path / "worker-0.jsonl")
        time.sleep(4.0)  # well past the 1.5 s lease
        during = _steps(tmp_path / "worker-0.jsonl")
        with PSClient(addresses, heartbeat=False) as c:
            evictions = [s["evictions"] for s in c.stats()]
        _cut(ns, ns_if, how, on=False)  # the link returns
        try:
            out_near, _ = near.communicate(timeout=120)
            out_far, _ = far.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for p in (near, far):
                p.kill()
            pytest.fail(f"a worker hung after the partition ended; near:\n{near.communicate()[0][-3000:]}\n"
                        f"far:\n{far.communicate()[0][-3000:]}\nservers:\n{log.getvalue()[-3000:]}")
    finally:
        stop_all(servers)
        for p in (locals().get("near"), locals().get("far")):
            if p is not None and p.poll() is None:
                p.kill()
    assert near.returncode == 0, out_near
    assert far.returncode == 0, out_far
    assert all(e >= 1 for e in evictions), evictions  # the partitioned worker was evicted
    assert "registering again" in out_far, out_far  # it came back under its id
    records = [json.loads(x) for x in (tmp_path / "worker-1.jsonl").read_text().splitlines()]
    last = max(r["step"] for r in records if "final" not in r)
    if mode == "async":  # it resumes from its clock and does its remaining steps
        assert last == STEPS - 1
    else:  # sync: it rejoins at the current step, which the other worker may already have taken to the end
        assert last >= 30
    assert during > near_at_cut + 5  # the other worker went on while the link was down
