"""The Prometheus endpoint of a real server: counters, gauges and histograms move with traffic."""

import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from ps.config import OptimizerConfig, ServerConfig
from ps.errors import InvalidArgument, Unauthenticated
from ps.server.app import create_server
from ps.worker.client import PSClient


def scrape(srv):
    """{name: value} for plain samples, {(name, le): value} for histogram buckets."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, s.labels["le"]) if "le" in s.labels else s.name: s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_endpoint_counts_pushes_pulls_bytes_staleness_latency_rejections_and_workers():
    srv = create_server(ServerConfig(mode="async", metrics_port=0, auth_token="t"))
    a = PSClient([srv.address], "a", auth_token="t")
    b = PSClient([srv.address], "b", auth_token="t")
    try:
        a.setup({"w": torch.zeros(100)}, OptimizerConfig("sgd", lr=0.1))
        b.setup({"w": torch.zeros(100)}, OptimizerConfig("sgd", lr=0.1))
        a.pull(0)
        b.pull(0)
        a.push({"w": torch.ones(100)}, 0)
        b.push({"w": torch.ones(100)}, 0)  # computed before a's update: staleness 1
        with pytest.raises(InvalidArgument):
            a.push({"w": torch.full((100,), float("nan"))}, 1)
        with pytest.raises(Unauthenticated):
            PSClient([srv.address], "x", auth_token="wrong", retry_timeout=1).stats()
        m = scrape(srv)
        assert m["ps_pushes_total"] == 2 and m["ps_pulls_total"] == 2
        assert m["ps_pushed_bytes_total"] == 800 and m["ps_pulled_bytes_total"] == 800
        assert m["ps_rejected_requests_total"] == 1 and m["ps_unauthenticated_requests_total"] == 1
        assert m["ps_active_workers"] == 2 and m["ps_version"] == 2
        assert m[("ps_staleness_bucket", "0")] == 1 and m[("ps_staleness_bucket", "1")] == 2
        assert m[("ps_apply_seconds_bucket", "+Inf")] == 2 and m["ps_apply_seconds_count"] == 2
        assert m["ps_evictions_total"] == 0
    finally:
        a.close()
        b.close()
        srv.stop(grace=0)


def test_tables_rows_admission_and_evictions_are_exported():
    from ps.tables import TableSpec

    srv = create_server(ServerConfig(mode="async", metrics_port=0))
    try:
        with PSClient([srv.address], "a") as c:
            c.setup({"w": torch.zeros(2)}, OptimizerConfig("sgd", lr=0.1))
            c.init_tables([TableSpec("t", 4, admit_after=2, max_rows=2)])
            for clock in range(2):
                c.push_rows(clock, {"t": (torch.tensor([1, 2, 3]), torch.ones(3, 4))})
            c.pull_rows(None, {"t": torch.tensor([1, 9])})
        m = scrape(srv)
        assert m["ps_table_rows"] == 2 and m["ps_table_version"] == 2
        assert m["ps_table_rows_created_total"] == 3 and m["ps_table_rows_evicted_lru_total"] == 1
        assert m["ps_table_admission_dropped_rows_total"] == 3 and m["ps_table_rows_pushed_total"] == 6
        assert m["ps_table_rows_pulled_total"] == 2 and m["ps_table_pending_ids"] == 0
    finally:
        srv.stop(grace=0)


def test_metrics_are_off_by_default():
    srv = create_server(ServerConfig())
    try:
        assert srv.metrics is None and srv.metrics_port == -1
    finally:
        srv.stop(grace=0)
