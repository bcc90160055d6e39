"""Prometheus text exposition (format 0.0.4) of the dashboard's counters.

Written by hand rather than with ``prometheus_client``: a dozen lines of a
stable, documented text format, no extra dependency, and no process-global
registry (two dashboards in one process, as in the tests, would otherwise
collide on metric names).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["CONTENT_TYPE", "exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_PREFIX = "boldstream_dashboard_"


def _value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if float(v).is_integer():
        return str(int(v))
    return repr(float(v))


def _metric(lines: list[str], name: str, kind: str, help_text: str, value: float) -> None:
    full = _PREFIX + name
    lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {_value(value)}"]


def exposition(m: Mapping[str, Any]) -> str:
    """The exposition text for :meth:`DashboardState.metrics` output ``m``."""
    lines: list[str] = []
    _metric(
        lines,
        "volumes_received_total",
        "counter",
        "Volumes the receiver assembled (volume-received messages), all series.",
        m["volumes_received"],
    )
    _metric(
        lines,
        "volumes_missing_total",
        "counter",
        "Volumes that will not come (receiver gave up, or the orderer skipped them).",
        m["volumes_missing"],
    )
    _metric(
        lines,
        "volumes_late_total",
        "counter",
        "Missing volumes whose reason was a timeout (did not arrive in time).",
        m["volumes_late"],
    )
    _metric(
        lines,
        "messages_received_total",
        "counter",
        "Messages the dashboard's subscriber decoded.",
        m["messages"],
    )
    _metric(
        lines,
        "messages_dropped_total",
        "counter",
        "Messages the subscriber missed (holes in the publishers' sequence numbers).",
        m["dropped"],
    )
    _metric(
        lines,
        "messages_bad_total",
        "counter",
        "Messages that could not be decoded.",
        m["bad_messages"],
    )
    _metric(
        lines,
        "publisher_connected",
        "gauge",
        "1 while the subscriber is connected to the pipeline's publisher.",
        1 if m["connected"] else 0,
    )
    _metric(lines, "event_streams", "gauge", "Pages connected to /events.", m["listeners"])

    name = _PREFIX + "latency_seconds"
    lines += [
        f"# HELP {name} End-to-end latency per volume, last DICOM instance in to QC published.",
        f"# TYPE {name} histogram",
    ]
    cumulative = 0
    bounds = [*m["buckets"], math.inf]
    for bound, count in zip(bounds, m["bucket_counts"], strict=True):
        cumulative += count
        lines.append(f'{name}_bucket{{le="{_value(bound)}"}} {cumulative}')
    lines.append(f"{name}_sum {_value(m['latency_sum_s'])}")
    lines.append(f"{name}_count {m['latency_count']}")
    return "\n".join(lines) + "\n"
