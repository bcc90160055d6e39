"""The technician's live dashboard: result streams in, a page over HTTP out.

``Dashboard(pub_endpoint).start()`` subscribes to the pipeline's result
publisher and serves the page on 127.0.0.1 (see docs/dashboard.md).
"""

from __future__ import annotations

from boldstream.sinks.dashboard.app import Dashboard, DashboardError
from boldstream.sinks.dashboard.state import DashboardState, SeriesState, series_id

__all__ = ["Dashboard", "DashboardError", "DashboardState", "SeriesState", "series_id"]
