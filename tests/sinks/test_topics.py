"""sinks.topics: names, fields and builders agree with the codec and the analysis types."""

from __future__ import annotations

import boldstream_tests_fake_publisher as fake
import numpy as np
import pytest

from boldstream.analysis.motion import PARAM_NAMES
from boldstream.analysis.qc import QCFrame
from boldstream.analysis.usable import UsableData
from boldstream.receiver.volume import VolumeIncomplete
from boldstream.sinks import topics
from boldstream.stream.codec import decode, encode
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, SeriesStart

SERIES = fake.fake_series()


def roundtrip(payload: object) -> Message:
    return decode(encode(Message(payload)))  # type: ignore[arg-type]


def test_event_topics_are_the_payload_kinds() -> None:
    assert roundtrip(SeriesStart(SERIES, 1.0)).topic == topics.SERIES_START
    assert roundtrip(SeriesEnd(SERIES, 1.0)).topic == topics.SERIES_END
    assert roundtrip(Gap(SERIES, 1, "timeout")).topic == topics.GAP
    assert roundtrip(VolumeIncomplete(SERIES, 1, 0, 3, 1.0, 2.0)).topic == topics.VOLUME_MISSING


def test_no_dashboard_subscription_matches_whole_volumes() -> None:
    # ZeroMQ filters by prefix: none may be a prefix of the "volume" topic.
    assert not any("volume".startswith(t) for t in topics.DASHBOARD_TOPICS)
    assert len(set(topics.DASHBOARD_TOPICS)) == len(topics.DASHBOARD_TOPICS)


def test_builders_carry_the_documented_fields_through_the_codec() -> None:
    received = roundtrip(
        topics.volume_received_result(
            SERIES, 3, shape=(64, 64, 36), voxel_mm=(3.0, 3.0, 3.5), assembly_ms=4.5, instances=1
        )
    )
    assert received.topic == topics.VOLUME_RECEIVED
    assert isinstance(received.payload, Result)
    assert tuple(received.payload.values) == topics.VOLUME_RECEIVED_FIELDS

    motion = roundtrip(
        topics.motion_result(
            SERIES,
            3,
            [0.1, 0.2, 0.3, 0.01, 0.02, 0.03],
            flagged=True,
            reason="spike",
            iterations=5,
            correlation=0.97,
        )
    )
    assert isinstance(motion.payload, Result)
    assert tuple(motion.payload.values) == topics.MOTION_FIELDS
    assert [motion.payload.values[n] for n in PARAM_NAMES] == [0.1, 0.2, 0.3, 0.01, 0.02, 0.03]

    usable = UsableData(tr_s=0.8)
    frame = QCFrame(3, 0.1, 20.0, 1.1, 800.0, 50.0, False, (), usable.add(None))
    qc = roundtrip(topics.qc_result(SERIES, 3, frame, latency_ms=210.0))
    assert isinstance(qc.payload, Result)
    assert tuple(qc.payload.values) == topics.QC_FIELDS
    assert tuple(qc.payload.values["usable"]) == topics.USABLE_FIELDS
    assert tuple(qc.payload.values["usable"]["thresholds"][0]) == topics.USABLE_THRESHOLD_FIELDS

    cmap = fake.target_map((-36.0, 30.0, 28.0))
    target = roundtrip(
        topics.target_result(
            SERIES,
            3,
            {
                "status": "provisional",
                "ras_mm": [1, 2, 3],
                "mni_mm": [4, 5, 6],
                "split_half_mm": None,
                "drift_mm": None,
                "good_minutes": 1.0,
            },
            correlation_map=cmap,
            vox2ras=fake.vox2ras(),
        )
    )
    assert isinstance(target.payload, Result)
    assert set(topics.TARGET_FIELDS) <= set(target.payload.values)
    np.testing.assert_array_equal(target.payload.arrays[topics.TARGET_ARRAY_MAP], cmap)
    np.testing.assert_array_equal(target.payload.affines[topics.TARGET_AFFINE], fake.vox2ras())

    warning = roundtrip(topics.warning_result(None, None, "spool 90% full", code="spool-full"))
    assert isinstance(warning.payload, Result)
    assert tuple(warning.payload.values) == topics.WARNING_FIELDS


def test_builders_refuse_malformed_input() -> None:
    with pytest.raises(ValueError, match="6 values"):
        topics.motion_result(
            SERIES, 0, [0.0] * 5, flagged=False, reason=None, iterations=0, correlation=1.0
        )
    with pytest.raises(ValueError, match="status"):
        topics.target_result(
            SERIES,
            0,
            {"status": "final"},
            correlation_map=np.zeros((2, 2, 2), np.float32),
            vox2ras=np.eye(4),
        )
    with pytest.raises(ValueError, match="3-D"):
        topics.target_result(
            SERIES,
            0,
            {"status": "stable"},
            correlation_map=np.zeros((2, 2), np.float32),
            vox2ras=np.eye(4),
        )
