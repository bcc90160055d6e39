"""``Pipeline.warn``: a warning that belongs to no series reaches subscribers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import zmq
from pipeline_support import pipeline_settings, subscribe

from boldstream.pipeline.service import Pipeline
from boldstream.stream.messages import Result

pytestmark = pytest.mark.timeout(60)


def test_warn_publishes_a_warning_without_a_series(tmp_path: Path) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    pipeline = Pipeline(pipeline_settings(tmp_path, "pipeline.mode='thread'"), context=ctx)
    pipeline.start()
    try:
        sub = subscribe(ctx, pipeline)
        pipeline.warn("the receiver's ingest process is down", "ingest-down")
        message = sub.recv(timeout_ms=10000)
        assert message is not None and message.topic == "warning"
        assert isinstance(message.payload, Result)
        assert message.payload.values["code"] == "ingest-down"
        assert "ingest process is down" in message.payload.values["message"]
        sub.close()
    finally:
        pipeline.stop()
        ctx.term()
