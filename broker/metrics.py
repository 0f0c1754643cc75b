"""Prometheus metrics of the broker (`/metrics`).

Two sources. Gauges (memory, tiers, states, queues) are read at scrape time
from the status the broker's loop last published, so a scrape never touches
the scheduler from the HTTP thread. Counters and histograms (requests,
evictions, move times) are fed by events as they happen, on the loop's thread;
prometheus_client's own locks make them safe to read from the HTTP thread.

Label values come from the configuration (daemon names, tiers, states) or
from small fixed sets (outcomes are error codes), never from request
arguments, so the number of series stays bounded.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import (CollectorRegistry, Counter, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from modelhost.protocol import DaemonState, Tier

# Request times run from a few milliseconds (a warm TTS chunk) to minutes (a
# video render, a training stage).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                   600)
# Tier moves: an onload of a small model to a 30 s load of a large one.
MOVE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
STATES = DaemonState.ALL
# A tier move down for one of these reasons counts as an eviction.
EVICTION_REASONS = ("room", "idle_ttl", "unload")
UNKNOWN = "(unknown)"

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self, daemons: list[str], latest_status: Callable[[], dict | None]):
        # `_created` series double the output and no dashboard here reads them.
        disable_created_metrics()
        self.daemons = set(daemons)
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "modelhost_requests", "Requests that got their terminal reply, by outcome (ok, "
            "cancelled, or the error code)", ("daemon", "method", "outcome"),
            registry=self.registry)
        self.queue_seconds = Histogram(
            "modelhost_request_queue_seconds", "Time from arrival until the daemon got the "
            "request (all of it, for requests that never ran)", ("daemon", "method"),
            buckets=REQUEST_BUCKETS, registry=self.registry)
        self.run_seconds = Histogram(
            "modelhost_request_run_seconds", "Time from dispatch to the terminal reply",
            ("daemon", "method"), buckets=REQUEST_BUCKETS, registry=self.registry)
        self.evictions = Counter(
            "modelhost_evictions", "Tier moves down: to make room for other work (room), "
            "after idle_ttl_s (idle_ttl) or asked for (unload)", ("daemon", "tier", "reason"),
            registry=self.registry)
        self.move_seconds = Histogram(
            "modelhost_tier_move_seconds", "How long a tier move took, by the tier reached; "
            "tier=resident is the load time", ("daemon", "tier"), buckets=MOVE_BUCKETS,
            registry=self.registry)
        self.registry.register(_StatusCollector(latest_status))
        # (daemon, method, outcome) -> [count, queue time, run time] series of a request
        # (run time made on its first use: a series exists once observed). labels()
        # checks and locks on every look-up, which costs more than the count it makes.
        self._request_series: dict[tuple, list] = {}

    def observe(self, event: dict) -> None:
        """An event sink: count what happened."""
        kind = event["kind"]
        daemon = event.get("daemon")
        if daemon not in self.daemons:
            daemon = UNKNOWN
        if kind == "request":
            method = event.get("method") or UNKNOWN
            key = (daemon, method, event["outcome"])
            series = self._request_series.get(key)
            if series is None:
                series = self._request_series[key] = [
                    self.requests.labels(*key), self.queue_seconds.labels(daemon, method), None]
            series[0].inc()
            series[1].observe(event["queue_s"])
            if event.get("run_s") is not None:
                if series[2] is None:
                    series[2] = self.run_seconds.labels(daemon, method)
                series[2].observe(event["run_s"])
        elif kind == "move" and event.get("eviction") and event.get("cause") in EVICTION_REASONS:
            self.evictions.labels(daemon, event["to"], event["cause"]).inc()
        elif kind == "moved" and not event.get("failed") and event.get("took_s") is not None:
            self.move_seconds.labels(daemon, event["tier"]).observe(event["took_s"])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _StatusCollector:
    """Gauges from the broker's last published status, read at scrape time."""

    def __init__(self, latest_status: Callable[[], dict | None]):
        self.latest_status = latest_status

    def describe(self):
        # Known in advance, so the registry does not collect to learn the names.
        return list(self._families())

    def collect(self):
        return self._families(self.latest_status())

    def _families(self, status: dict | None = None):
        status = status or {"broker": {}, "memory": {"devices": []}, "daemons": []}
        device = {key: GaugeMetricFamily("modelhost_device_memory_{}_bytes".format(key), text,
                                         labels=("device",))
                  for key, text in (
                      ("total", "Memory of the device"),
                      ("used", "Memory in use on the device, by anyone (the probe's reading)"),
                      ("threshold", "What the broker may use of the device"),
                      ("committed", "What the broker counts as taken: daemons at their "
                                    "tiers, running calls' peaks, external memory if counted"),
                      ("external", "Memory of processes that are not modelhost daemons"))}
        for row in status["memory"]["devices"]:
            for key, family in device.items():
                if row.get(key) is not None:
                    family.add_metric((row.get("id") or row.get("name", "?"),), row[key])
        yield from device.values()

        memory = GaugeMetricFamily("modelhost_daemon_memory_bytes", "Memory the daemon holds "
                                   "now (the probe's reading for its process)",
                                   labels=("daemon", "device"))
        footprint = GaugeMetricFamily(
            "modelhost_daemon_footprint_bytes", "The daemon's resident and peak memory, as "
            "declared in the configuration and as measured", labels=("daemon", "kind", "source"))
        tier = GaugeMetricFamily("modelhost_daemon_tier", "1 for the tier the daemon is at",
                                 labels=("daemon", "tier"))
        state = GaugeMetricFamily("modelhost_daemon_state", "1 for the daemon's state",
                                  labels=("daemon", "state"))
        restarts = CounterMetricFamily("modelhost_daemon_restarts", "Restarts of the daemon's "
                                       "process by its supervisor", labels=("daemon",))
        queued = GaugeMetricFamily("modelhost_daemon_queue_depth", "Requests waiting",
                                   labels=("daemon",))
        running = GaugeMetricFamily("modelhost_daemon_in_flight", "Calls running",
                                    labels=("daemon",))
        pinned = GaugeMetricFamily("modelhost_daemon_pinned", "1 when the daemon is pinned",
                                   labels=("daemon",))
        for row in status["daemons"]:
            name = row["name"]
            if row.get("memory_bytes") is not None:
                memory.add_metric((name, row.get("device") or ""), row["memory_bytes"])
            for source in ("declared", "measured"):
                figures = (row.get("footprint") or {}).get(source) or {}
                for kind in ("resident", "peak"):
                    if figures.get(kind) is not None:
                        footprint.add_metric((name, kind, source), figures[kind])
            for value in Tier.ALL:
                tier.add_metric((name, value), 1 if row.get("tier") == value else 0)
            for value in STATES:
                state.add_metric((name, value), 1 if row.get("state") == value else 0)
            restarts.add_metric((name,), row.get("restarts") or 0)
            queued.add_metric((name,), row.get("queued") or 0)
            running.add_metric((name,), row.get("running") or 0)
            pinned.add_metric((name,), 1 if row.get("pinned") else 0)
        yield from (memory, footprint, tier, state, restarts, queued, running, pinned)
        uptime = GaugeMetricFamily("modelhost_broker_uptime_seconds", "Since the broker started")
        if status["broker"].get("uptime_s") is not None:
            uptime.add_metric((), status["broker"]["uptime_s"])
        yield uptime


def metric_names() -> set[str]:
    """The names this module exposes (histograms and counters by their base name)."""
    metrics = Metrics([], lambda: None)
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names
