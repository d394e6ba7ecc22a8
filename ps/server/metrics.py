"""Prometheus metrics of a shard, read from its counters at scrape time (nothing on the hot path
but the apply-latency histogram the shard keeps anyway)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ps.server.shard import Shard

STALENESS_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128)
COUNTERS = {  # counter key -> (metric name without ps_ and _total, help)
    "pushes": ("pushes", "gradient pushes applied or accumulated"),
    "pulls": ("pulls", "pulls served"),
    "bytes_pushed": ("pushed_bytes", "tensor bytes received in pushes"),
    "bytes_pulled": ("pulled_bytes", "tensor bytes sent in pulls"),
    "rejected": ("rejected_requests", "requests refused as invalid (bad shape, dtype, key, NaN, malformed bytes, ...)"),
    "evictions": ("evictions", "workers evicted (lease timeout, or clock stalled past the progress timeout)"),
    "stalled_evictions": ("stalled_evictions", "workers evicted because their clock stopped moving while others waited"),
    "refused_evicted": ("evicted_pushes", "pushes refused because their worker had been evicted (answered EVICTED)"),
    "overloaded": ("overloaded_requests", "requests refused RESOURCE_EXHAUSTED at the bound on in-flight bytes"),
    "dropped": ("dropped_pushes", "sync pushes too late for their step"),
    "duplicates": ("duplicate_pushes", "retried pushes ignored"),
    "lost_updates": ("lost_updates", "updates a restart lost (a checkpoint did not have them, or none was there)"),
    "reinitialized": ("reinitializations", "times a worker re-initialised this shard from its weights after it restarted empty"),
    "checkpoints": ("checkpoints", "checkpoints written"),
    "unauthenticated": ("unauthenticated_requests", "calls refused for a missing or wrong auth token"),
}


def _family(kind, name: str, doc: str, labels: list[str], samples):
    """A metric family of `kind` with one sample per (label values, value) in `samples`."""
    family = kind(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


class ShardCollector(Collector):
    def __init__(self, shard: Shard):
        self.shard = shard

    def collect(self):
        s = self.shard.metrics()
        labels = {"shard": str(s["shard_id"]), "mode": s["mode"]}
        names, values = list(labels), list(labels.values())
        for key, (name, doc) in COUNTERS.items():
            yield _family(CounterMetricFamily, f"ps_{name}", doc, names, [(values, s["counters"].get(key, 0))])
        for name, doc, value in (("version", "updates applied (sync: steps)", s["version"]),
                                 ("active_workers", "workers holding a lease", s["active_workers"]),
                                 ("waiting_pulls", "pulls waiting for their step (they hold no thread)",
                                  s["waiting_pulls"]),
                                 ("pending_bytes", "bytes held in half-assembled pushes", s["pending_bytes"])):
            yield _family(GaugeMetricFamily, f"ps_{name}", doc, names, [(values, value)])
        # Per server-held table (label `table`): rows held and admission counts now, and its counters.
        tables, per_table = s["tables"], [*names, "table"]
        for name, doc, key in (("table_rows", "rows of a server-held table held on this shard", "rows"),
                               ("table_pending_ids", "ids counted for admission, no row yet", "pending"),
                               ("table_version", "table updates applied", "version")):
            yield _family(GaugeMetricFamily, f"ps_{name}", doc, per_table,
                          [([*values, table], t[key]) for table, t in tables.items()])
        for key, (name, doc) in TABLE_COUNTERS.items():
            yield _family(CounterMetricFamily, f"ps_table_{name}", doc, per_table,
                          [([*values, table], t[key]) for table, t in tables.items()])
        hist = s["staleness_histogram"]
        buckets = [(str(b), sum(n for k, n in hist.items() if k <= b)) for b in STALENESS_BUCKETS]
        h = HistogramMetricFamily("ps_staleness", "versions between a gradient's base and its apply", labels=names)
        h.add_metric(values, buckets + [("+Inf", sum(hist.values()))], sum(k * n for k, n in hist.items()))
        yield h
        bounds, counts, total = s["apply_latency"]
        cumulative, running = [], 0
        for b, n in zip(bounds, counts):
            running += n
            cumulative.append((str(b), running))
        h = HistogramMetricFamily("ps_apply_seconds", "time to apply one update (optimizer step)",
                                  labels=names)
        h.add_metric(values, cumulative + [("+Inf", running + counts[-1])], total)
        yield h


TABLE_COUNTERS = {  # TableStats key -> (metric name without ps_table_ and _total, help)
    "created": ("rows_created", "rows created (first gradient, or the admit_after-th)"),
    "evicted_idle": ("rows_evicted_idle", "rows evicted after evict_after updates without one"),
    "evicted_lru": ("rows_evicted_lru", "rows evicted, least recently updated first, over max_rows"),
    "admission_dropped": ("admission_dropped_rows", "gradient rows dropped: their id was not admitted yet"),
    "rows_pulled": ("rows_pulled", "rows read"),
    "rows_pushed": ("rows_pushed", "gradient rows received"),
    "pending_forgotten": ("pending_forgotten_ids", "admission counts dropped at the cap of ids counted"),
}


def serve(shard: Shard, host: str, port: int):
    """Start the /metrics endpoint; returns (http server, its port)."""
    registry = CollectorRegistry()
    registry.register(ShardCollector(shard))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server, server.server_port
