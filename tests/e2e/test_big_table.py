"""A table larger than any worker keeps: 10 million rows x 16 dims (640 MB of float32) held by
2 server shards, filled by a worker process whose peak resident memory stays under 300 MB."""

import json
import subprocess
import sys

from ps.cli.launch import start_servers, stop_all
from tests.conftest import _Sink

ROWS, BATCH = 10_000_000, 65536


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_ten_million_rows_on_two_shards_with_a_small_worker():
    procs = start_servers(2, "async", 1, out=_Sink())
    try:
        out = subprocess.run([sys.executable, "-m", "tests.e2e.big_table_worker", ",".join(p.address for p in procs),
                              str(ROWS), str(BATCH), "auto"], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        servers_mb = [_rss_mb(p.popen.pid) for p in procs]
    finally:
        stop_all(procs)
    assert result["rows"] == ROWS and result["probe_ok"]
    assert min(result["per_shard"]) > 0.49 * ROWS  # spread by the id's hash
    assert result["maxrss_mb"] < 300, result
    # The rows live on the servers: each holds its half (320 MB of values) and its index.
    assert all(mb > 320 for mb in servers_mb), servers_mb
    print(f"worker peak RSS {result['maxrss_mb']:.0f} MB; servers {servers_mb}")
