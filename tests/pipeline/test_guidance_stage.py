"""pipeline/guidance_stage.py: guidance from qc and target results, into the files."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from boldstream.analysis.qc import QCFrame
from boldstream.analysis.usable import UsableData
from boldstream.config.settings import Settings
from boldstream.pipeline.guidance_stage import GuidanceStage, guidance_options
from boldstream.receiver.volume import SeriesInfo
from boldstream.sinks import topics
from boldstream.sinks.bids import BidsSink
from boldstream.stream.codec import encode
from boldstream.stream.messages import Message, SeriesEnd, SeriesStart

TR = 2.0
SERIES = SeriesInfo(
    series_uid="1.2.3.4.5",
    study_uid="1.2.3.4",
    description="rest_bold",
    session_key="sess-9",
    series_number=3,
    tr_s=TR,
)
SCHEMA = json.loads(
    (Path(__file__).resolve().parents[2] / "sinks/schemas/guidance.schema.json").read_text()
)


def qc(index: int, usable: UsableData) -> Message:
    summary = usable.add(None if index == 0 else 0.1)
    frame = QCFrame(index, None, None, None, 800.0, None, False, (), summary)
    return Message(topics.qc_result(SERIES, index, frame, latency_ms=100.0))


def target(index: int, good_minutes: float, split: float | None, status: str) -> Message:
    values = {
        "status": status,
        "ras_mm": [-38.0, 30.0, 35.0],
        "mni_mm": None,
        "split_half_mm": split,
        "drift_mm": 1.0,
        "good_minutes": good_minutes,
        "censored_minutes": 0.0,
        "minutes": good_minutes,
        "reasons": [] if status == "stable" else ["not yet"],
        "p_value": 0.005,
        "held_s": 60.0 if split is not None and split <= 7 else None,
    }
    result = topics.target_result(
        SERIES,
        index,
        values,
        correlation_map=np.zeros((2, 2, 2), np.float32),
        vox2ras=np.eye(4),
    )
    return Message(result)


def run(stage: GuidanceStage, n: int, split: Any) -> list[Message]:
    usable = UsableData(tr_s=TR, fd_thresholds=(0.2, 0.5))
    out: list[Message] = []
    for i in range(n):
        out += stage.observe(qc(i, usable))
        if i and i % 15 == 0:  # a target every 30 s of data
            good = (i + 1) * TR / 60
            d = split(good)
            status = "stable" if good >= 10 and d <= 7 else "provisional"
            out += stage.observe(target(i, good, d, status))
    end = Message(SeriesEnd(SERIES, time.time(), n_volumes=n, reason="complete"))
    out += [m for m in stage.process(end) if m.topic == topics.GUIDANCE]
    return out


def test_guidance_follows_the_target_and_the_scan() -> None:
    stage = GuidanceStage(**guidance_options(Settings()))
    out = run(stage, 240, lambda m: 24 / math.sqrt(m) + 1.5)
    assert out and all(m.topic == topics.GUIDANCE for m in out)
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for m in out:
        header = json.loads(bytes(encode(m)[1]))
        validator.validate(header)
    states = [m.payload.values["state"] for m in out]  # type: ignore[union-attr]
    assert states[0] == "cannot-tell-yet"
    assert "keep-scanning" in states
    keep = next(m for m in out if m.payload.values["state"] == "keep-scanning")  # type: ignore[union-attr]
    values = keep.payload.values  # type: ignore[union-attr]
    assert values["minutes_more"] > 0 and len(values["minutes_more_range"]) == 2
    assert values["fd_threshold_mm"] == 0.5
    assert "good minutes at FD < 0.5 mm" in values["reason"]
    # every 5 volumes between targets, and once at the end
    assert len(out) > 240 // 15 + 240 // 5 - 5


def test_no_target_no_guidance() -> None:
    stage = GuidanceStage()
    usable = UsableData(tr_s=TR)
    assert [m for i in range(20) for m in stage.observe(qc(i, usable))] == []


def test_the_last_guidance_is_written_beside_the_target(tmp_path: Path) -> None:
    stage = GuidanceStage(**guidance_options(Settings()))
    sink = BidsSink(tmp_path, durable=False, exports=False)
    sink.handle(Message(SeriesStart(SERIES, time.time())))
    usable = UsableData(tr_s=TR, fd_thresholds=(0.2, 0.5))
    for i in range(300):
        for m in [
            qc(i, usable),
            *([target(i, (i + 1) * TR / 60, 30.0, "provisional")] if i and i % 15 == 0 else []),
        ]:
            for out in stage.process(m):
                sink.handle(out)
    end = Message(SeriesEnd(SERIES, time.time(), n_volumes=300, reason="complete"))
    path = sink.files_for(SERIES).guidance
    for out in stage.process(end):
        if out.topic == topics.SERIES_END:
            assert not path.exists()  # written at the end, from the last guidance
        sink.handle(out)
    written = json.loads(path.read_text())
    assert written["state"] == "not-settling"
    assert written["index"] == 299
    assert path.parent == sink.files_for(SERIES).target.parent
