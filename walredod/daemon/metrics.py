"""Prometheus metrics of the daemon, on their own registry (several daemons may live in one test process)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from walredod.engine.board import LATENCY_BOUNDS

log = logging.getLogger("walredod.daemon.metrics")

# The redo children's own buckets (their board), so that both paths' latencies share one histogram's bounds.
LATENCY_BUCKETS = LATENCY_BOUNDS
RECORD_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("walredod_requests",
                                "Requests the supervisor answered, by outcome (ok or the error code); a batch "
                                "counts once. Requests sent straight to a worker (the direct data path) are not "
                                "counted here: see walredod_worker_requests_served.",
                                ["status"], registry=self.registry)
        self.latency = Histogram("walredod_request_seconds",
                                 "Time from the supervisor accepting a request to its reply, for requests answered "
                                 "ok through the supervisor (not the direct data path).",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.records = Histogram("walredod_records_per_request",
                                 "WAL records in a redo request answered ok through the supervisor (a batch "
                                 "counts as one request of 0 records).",
                                 buckets=RECORD_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("walredod_queue_depth", "Requests the supervisor accepted that wait for a worker.",
                                 registry=self.registry)
        self.in_flight = Gauge("walredod_worker_in_flight",
                               "Requests (a batch counts once) the supervisor handed to a worker and has no reply "
                               "to yet; direct requests are not counted.", ["slot"],
                               registry=self.registry)
        self.served = Gauge("walredod_worker_requests_served",
                            "Requests a worker has answered ok since it started, on both paths, each request of a "
                            "batch counted, from its heartbeats.",
                            ["slot"], registry=self.registry)
        self.restarts = Counter("walredod_worker_restarts", "Workers that ended and were replaced, by cause.",
                                ["cause"], registry=self.registry)
        self.refused_requests = Counter(
            "walredod_refused_requests", "Requests refused as unavailable by a limit: max_pending, max_pending_bytes "
            "or max_pending_per_client.", ["reason"], registry=self.registry)
        self.memory_resets = Counter(
            "walredod_memory_resets", "Times the supervisor dropped every client connection because its resident "
            "memory passed daemon.max_memory_bytes.", registry=self.registry)
        self.dropped_replies = Counter(
            "walredod_dropped_replies", "Replies the supervisor could not hand to ZeroMQ, by reason: 'unread' (the "
            "client has daemon.max_unread_replies replies it has not read) or 'departed' (its connection is gone).",
            ["reason"], registry=self.registry)
        self.refused_connections = Counter(
            "walredod_refused_connections", "Connections refused at the handshake (ZAP), by ZAP domain: "
            "walredod-workers (a process posing as a worker) or walredod-clients (a tcp client without an allowed key).",
            ["domain"], registry=self.registry)
        self._local = LocalPathCollector()
        self.registry.register(self._local)
        self._server = None
        self._by_status: dict[str, Counter] = {}  # label lookups cost microseconds: once per value
        self._by_slot: dict[int, Gauge] = {}
        self._served_by_slot: dict[int, Gauge] = {}

    def observe(self, status: str, seconds: float, records: int) -> None:
        counter = self._by_status.get(status)
        if counter is None:
            counter = self._by_status[status] = self.requests.labels(status=status)
        counter.inc()
        if status == "ok":
            self.latency.observe(seconds)
            self.records.observe(records)

    def set_in_flight(self, slot: int, count: int) -> None:
        gauge = self._by_slot.get(slot)
        if gauge is None:
            gauge = self._by_slot[slot] = self.in_flight.labels(slot=str(slot))
        gauge.set(count)

    def set_served(self, slot: int, count: int) -> None:
        gauge = self._served_by_slot.get(slot)
        if gauge is None:
            gauge = self._served_by_slot[slot] = self.served.labels(slot=str(slot))
        gauge.set(count)

    def set_local(self, slot: int, stats) -> None:
        """The local data path's counters of a slot's worker (walredod.daemon.backend.LocalStats), from its
        heartbeat: requests there never pass through the supervisor."""
        self._local.by_slot[slot] = stats

    def serve(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        server = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        self._server = server[0] if isinstance(server, tuple) else server
        log.info("metrics on http://%s/metrics", address)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class LocalPathCollector:
    """Requests served on the local data path (docs/local-data-path.md), per worker slot, as its worker last reported
    them. They count from the worker's start: a new worker in a slot starts again from zero (a counter reset, which
    Prometheus's rate() expects)."""

    def __init__(self):
        self.by_slot: dict = {}

    def describe(self):
        return []

    def collect(self):
        requests = CounterMetricFamily("walredod_local_requests", "Requests answered on the local data path, by "
                                       "status: ok, invalid_request (refused before redo; the child stays), "
                                       "internal.", labels=["slot", "status"])
        dropped = CounterMetricFamily("walredod_local_connections_dropped", "Local connections closed because a "
                                      "request's framing was wrong.", labels=["slot"])
        kills = CounterMetricFamily("walredod_local_deadline_kills", "Redo children killed for overrunning a "
                                    "local request's deadline.", labels=["slot"])
        records = CounterMetricFamily("walredod_local_records", "WAL records applied for local requests.",
                                      labels=["slot"])
        accepted = CounterMetricFamily("walredod_local_connections_accepted", "Local connections accepted.",
                                       labels=["slot"])
        open_now = GaugeMetricFamily("walredod_local_connections", "Local connections open.", labels=["slot"])
        latency = HistogramMetricFamily("walredod_local_request_seconds", "Time inside the redo child from a local "
                                        "request's arrival to its reply, for requests answered ok.",
                                        labels=["slot"])
        for slot, stats in sorted(self.by_slot.items()):
            label = str(slot)
            requests.add_metric([label, "ok"], stats.requests_ok)
            requests.add_metric([label, "invalid_request"], stats.requests_refused)
            requests.add_metric([label, "internal"], stats.requests_internal)
            dropped.add_metric([label], stats.connections_dropped)
            kills.add_metric([label], stats.deadline_kills)
            records.add_metric([label], stats.records)
            accepted.add_metric([label], stats.connections_accepted)
            open_now.add_metric([label], stats.connections_open)
            cumulative, buckets = 0, []
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), stats.latency_buckets):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            latency.add_metric([label], buckets, stats.latency_sum_ns / 1e9)
        yield from (requests, dropped, kills, records, accepted, open_now, latency)
