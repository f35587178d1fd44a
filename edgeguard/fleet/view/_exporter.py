"""``edgeguard fleet exporter``: the fleet's heartbeats as Prometheus metrics.

A custom collector: every scrape takes one ``FleetState.snapshot()`` (copies made under one lock) and builds
all metric families from it, so one scrape is one consistent picture of the fleet. Names carry the unit as a
suffix and counters end in ``_total`` (the Prometheus naming guide); labels are low-cardinality: fleet,
device, group (the device's first group, "" when none) and model name. The model version is a label only on
``edgeguard_model_info`` (a version change must not start a new series for every other metric).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgeguard.fleet.view._state import DeviceView, FleetState

__all__ = ["FleetCollector"]

_LABELS = ["fleet", "device", "group", "model"]

# (metric name, help, the DeviceView attribute, counter?, scale applied to the value)
_SERIES: tuple[tuple[str, str, str, bool, float], ...] = (
    ("edgeguard_inferences", "Inferences run since the worker started", "inferences", True, 1.0),
    ("edgeguard_inference_rate_per_second", "Inferences per second between the last two heartbeats", "rate",
     False, 1.0),
    ("edgeguard_rejected_inputs", "Inputs refused by the input guard or the model", "rejected", True, 1.0),
    ("edgeguard_outbox_depth", "Results waiting in the outbox for the broker", "outbox_depth", False, 1.0),
    ("edgeguard_outbox_oldest_age_seconds", "Age of the oldest result in the outbox", "outbox_oldest_age_s",
     False, 1.0),
    ("edgeguard_outbox_dropped", "Results the outbox dropped", "outbox_dropped", True, 1.0),
    ("edgeguard_uptime_seconds", "Time since the device's link started", "uptime_s", False, 1.0),
    ("edgeguard_restarts", "Worker restarts by the supervisor", "restarts", True, 1.0),
    ("edgeguard_mtbf_seconds", "Mean time between worker failures", "mtbf_s", False, 1.0),
    ("edgeguard_mttr_seconds", "Mean time to repair a worker failure", "mttr_s", False, 1.0),
)


def _labels(v: DeviceView) -> list[str]:
    return [v.fleet, v.device, v.groups[0] if v.groups else "", v.model or ""]


class FleetCollector(Collector):
    def __init__(self, state: FleetState, *, wall: Callable[[], float] = time.time) -> None:
        self.state = state
        self._wall = wall

    def collect(self) -> Iterator[Metric]:
        views = self.state.snapshot()  # the one snapshot this scrape reports
        now = self._wall()
        up = GaugeMetricFamily("edgeguard_device_up", "1 while the device's status is online", labels=_LABELS)
        degraded = GaugeMetricFamily(
            "edgeguard_device_degraded", "1 while the device reports itself degraded", labels=_LABELS
        )
        age = GaugeMetricFamily(
            "edgeguard_heartbeat_age_seconds", "Time since the last heartbeat arrived", labels=_LABELS
        )
        latency = GaugeMetricFamily(
            "edgeguard_inference_latency_seconds",
            "Inference latency quantiles the device reports",
            labels=[*_LABELS, "quantile"],
        )
        info = GaugeMetricFamily(
            "edgeguard_model_info",
            "The model and fast path each device runs (value always 1)",
            labels=[*_LABELS, "version", "accelerator"],
        )
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        for name, doc, _attr, counter, _scale in _SERIES:
            families[name] = (
                CounterMetricFamily(name, doc, labels=_LABELS)
                if counter
                else GaugeMetricFamily(name, doc, labels=_LABELS)
            )
        for v in views:
            labels = _labels(v)
            up.add_metric(labels, 1.0 if v.online else 0.0)
            degraded.add_metric(labels, 1.0 if v.degraded else 0.0)
            heartbeat_age = v.heartbeat_age(now)
            if heartbeat_age is not None:
                age.add_metric(labels, heartbeat_age)
            for q, ms in (("0.5", v.latency_p50_ms), ("0.99", v.latency_p99_ms)):
                if ms is not None:
                    latency.add_metric([*labels, q], ms / 1000.0)
            if v.model is not None:
                info.add_metric([*labels, str(v.version or ""), v.accelerator or ""], 1.0)
            for name, _doc, attr, _counter, scale in _SERIES:
                value = getattr(v, attr)
                if value is not None:
                    families[name].add_metric(labels, float(value) * scale)
        devices = GaugeMetricFamily("edgeguard_fleet_devices", "Devices the exporter knows, by state",
                                    labels=["state"])
        devices.add_metric(["online"], float(sum(1 for v in views if v.online)))
        devices.add_metric(["offline"], float(sum(1 for v in views if v.online is False)))
        dropped = CounterMetricFamily(
            "edgeguard_exporter_messages_dropped", "Device messages refused (malformed, too large)"
        )
        dropped.add_metric([], float(self.state.dropped))
        yield from (up, degraded, age, latency, info, *families.values(), devices, dropped)
