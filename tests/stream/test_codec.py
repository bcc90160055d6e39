"""Codec round trips for every message kind, in memory and over real sockets."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zmq

from boldstream.errors import StreamError
from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete
from boldstream.stream.codec import SCHEMA_VERSION, MessageError, decode, encode, recv, send
from boldstream.stream.messages import (
    EndOfStream,
    Gap,
    Message,
    Result,
    SeriesEnd,
    SeriesStart,
)

NewVolume = Callable[..., Volume]
NewSeries = Callable[..., SeriesInfo]


def roundtrip(message: Message) -> Message:
    frames = encode(message)
    # What a socket would hand back: independent byte strings per frame.
    return decode([bytes(memoryview(f)) if not isinstance(f, bytes) else f for f in frames])


def assert_same_volume(a: Volume, b: Volume) -> None:
    np.testing.assert_array_equal(a.data, b.data)
    assert b.data.dtype == np.float32 and b.data.dtype.isnative
    np.testing.assert_array_equal(a.vox2ras, b.vox2ras)
    assert a.series == b.series
    for name in (
        "index",
        "acquisition_time",
        "first_received",
        "last_received",
        "assembled",
        "instance_uids",
    ):
        assert getattr(a, name) == getattr(b, name), name


def test_volume_roundtrip_keeps_everything(new_volume: NewVolume) -> None:
    vol = new_volume(3)
    msg = Message(vol)
    msg.stamp("motion.in", 1.5)
    back = roundtrip(msg)
    assert isinstance(back.payload, Volume)
    assert_same_volume(vol, back.payload)
    assert back.kind == "volume" and back.topic == "volume"
    assert back.timestamps == {
        "received": vol.last_received,
        "assembled": vol.assembled,
        "motion.in": 1.5,
    }
    assert list(back.timestamps) == ["received", "assembled", "motion.in"]


def test_header_is_versioned_json_with_array_description(new_volume: NewVolume) -> None:
    frames = encode(Message(new_volume(0, shape=(5, 6, 7))))
    assert frames[0] == b"volume"
    header = json.loads(frames[1])
    assert header["v"] == SCHEMA_VERSION
    assert header["arrays"] == [{"name": "data", "dtype": "<f4", "shape": [5, 6, 7], "order": "C"}]
    assert np.array(header["body"]["vox2ras"]).shape == (4, 4)
    assert len(frames) == 3


def test_fortran_order_volume_goes_out_without_copy(new_volume: NewVolume) -> None:
    data = np.asfortranarray(np.random.default_rng(0).random((9, 8, 7), dtype=np.float32))
    frames = encode(Message(new_volume(1, data=data)))
    assert json.loads(frames[1])["arrays"][0]["order"] == "F"
    assert np.shares_memory(frames[2], data)
    back = decode(frames)
    assert isinstance(back.payload, Volume)
    np.testing.assert_array_equal(back.payload.data, data)


def test_non_contiguous_volume(new_volume: NewVolume) -> None:
    big = np.random.default_rng(1).random((20, 18, 16), dtype=np.float32)
    data = big[::2, 1::3, ::-2]
    assert not data.flags.c_contiguous and not data.flags.f_contiguous
    back = roundtrip(Message(new_volume(2, data=data)))
    assert isinstance(back.payload, Volume)
    np.testing.assert_array_equal(back.payload.data, data)


def test_big_endian_volume_arrives_as_native_float32(new_volume: NewVolume) -> None:
    native = np.random.default_rng(2).random((6, 5, 4), dtype=np.float32)
    data = native.astype(">f4")
    frames = encode(Message(new_volume(0, data=data)))
    assert json.loads(frames[1])["arrays"][0]["dtype"] == ">f4"
    back = decode(frames)
    assert isinstance(back.payload, Volume)
    assert back.payload.data.dtype == np.dtype("=f4")
    np.testing.assert_array_equal(back.payload.data, native)


def test_result_arrays_keep_dtype_byte_order_and_layout(new_series: NewSeries) -> None:
    rng = np.random.default_rng(3)
    arrays: dict[str, Any] = {
        "big_endian": np.arange(12, dtype=">i8").reshape(3, 4),
        "strided": rng.random((10, 10))[::3, ::2],
        "fortran": np.asfortranarray(rng.random((4, 5, 6))),
        "complex": (rng.random(5) + 1j * rng.random(5)).astype(np.complex64),
        "mask": rng.random((4, 4)) > 0.5,
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 3), dtype=np.uint16),
    }
    native2mni = np.eye(4)
    native2mni[:3, 3] = [1.0, -2.0, 3.25]
    result = Result(
        topic="qc",
        series=new_series(),
        index=12,
        values={"fd": 0.12, "dvars": None, "outlier": False, "labels": ["a", "b"]},
        arrays=arrays,
        affines={"native2mni": native2mni},
    )
    back = roundtrip(Message(result, {"received": 1.0}))
    assert back.topic == "qc" and back.kind == "result"
    p = back.payload
    assert isinstance(p, Result)
    assert p.series == result.series and p.index == 12
    assert p.values == {"fd": 0.12, "dvars": None, "outlier": False, "labels": ["a", "b"]}
    np.testing.assert_array_equal(p.affines["native2mni"], native2mni)
    assert set(p.arrays) == set(arrays)
    for name, sent in arrays.items():
        got = p.arrays[name]
        assert got.dtype == sent.dtype, name
        assert got.shape == sent.shape, name
        np.testing.assert_array_equal(got, sent)
        assert not got.flags.writeable


def test_result_without_series_and_numpy_scalars_in_values() -> None:
    result = Result(topic="target", series=None, index=None, values={"r": np.float32(0.5)})
    p = roundtrip(Message(result)).payload
    assert isinstance(p, Result)
    assert p.series is None and p.index is None and p.values == {"r": 0.5}


@pytest.mark.parametrize(
    "payload",
    [
        VolumeIncomplete(
            series=SeriesInfo("1.2", "1", "rest", "k"),
            index=4,
            slices_received=30,
            slices_expected=60,
            first_received=10.0,
            reported=20.0,
            reason="timeout: slices missing",
        ),
        SeriesStart(
            series=SeriesInfo("1.2", "1", "rest", "k", slice_timing=(0.0, 0.5)), started=1.0
        ),
        SeriesEnd(series=SeriesInfo("1.2", "1", "rest", "k"), ended=2.0, n_volumes=300, reason="x"),
        Gap(series=SeriesInfo("1.2", "1", "rest", "k"), index=7, reason="timeout"),
        EndOfStream(reason="operator"),
    ],
    ids=lambda p: type(p).__name__,
)
def test_event_roundtrip(payload: Any) -> None:
    msg = Message(payload, {"received": 1.0, "published": 2.0})
    back = roundtrip(msg)
    assert back.payload == payload
    assert back.kind == msg.kind and back.topic == msg.topic
    assert back.timestamps == {"received": 1.0, "published": 2.0}


def test_volume_missing_seeds_timestamps() -> None:
    p = VolumeIncomplete(SeriesInfo("1.2", "1", "rest", "k"), 4, 30, 60, 10.0, 20.0)
    assert Message(p).timestamps == {"received": 10.0, "assembled": 20.0}
    assert Message(p).kind == "volume-missing"


def test_sequence_and_publisher_travel(new_series: NewSeries) -> None:
    msg = Message(Gap(new_series(), 1, "timeout"), seq=41, publisher="motion-1a2b")
    back = roundtrip(msg)
    assert back.seq == 41 and back.publisher == "motion-1a2b"


# --------------------------------------------------------------------------- errors


def test_unknown_major_version_is_rejected(new_volume: NewVolume) -> None:
    frames = encode(Message(new_volume(0)))
    header = json.loads(frames[1])
    header["v"] = "2.0"
    frames[1] = json.dumps(header).encode()
    with pytest.raises(StreamError, match=r"unsupported schema version '2\.0'"):
        decode(frames)


def test_newer_minor_version_with_unknown_fields_is_read(new_volume: NewVolume) -> None:
    frames = encode(Message(new_volume(0)))
    header = json.loads(frames[1])
    header["v"] = "1.7"
    header["future"] = {"x": 1}
    header["series"]["new_field"] = "ignored"
    frames[1] = json.dumps(header).encode()
    assert isinstance(decode(frames).payload, Volume)


def test_missing_version_is_rejected(new_volume: NewVolume) -> None:
    frames = encode(Message(new_volume(0)))
    header = json.loads(frames[1])
    del header["v"]
    frames[1] = json.dumps(header).encode()
    with pytest.raises(MessageError, match="no schema version"):
        decode(frames)


def test_truncated_buffer_is_rejected_with_sizes(new_volume: NewVolume) -> None:
    frames = encode(Message(new_volume(0, shape=(4, 4, 4))))
    frames[2] = bytes(memoryview(frames[2]))[:-4]
    with pytest.raises(MessageError, match=r"holds 252 bytes .* needs 256"):
        decode(frames)


def test_missing_buffer_frame_is_rejected(new_volume: NewVolume) -> None:
    frames = encode(Message(new_volume(0)))
    with pytest.raises(MessageError, match=r"describes 1 array\(s\) but 0"):
        decode(frames[:2])


@pytest.mark.parametrize("dtype", ["|O8", "<U4", "|V8", "f4", "<M8"])
def test_unsafe_or_unknown_dtypes_are_rejected(new_volume: NewVolume, dtype: str) -> None:
    frames = encode(Message(new_volume(0, shape=(2, 2, 2))))
    header = json.loads(frames[1])
    header["arrays"][0]["dtype"] = dtype
    frames[1] = json.dumps(header).encode()
    with pytest.raises(MessageError, match="unsupported dtype"):
        decode(frames)


def test_garbage_header_and_too_few_frames() -> None:
    with pytest.raises(MessageError, match="not UTF-8 JSON"):
        decode([b"volume", b"\x80\x03pickle"])
    with pytest.raises(MessageError, match="at least 2 frames"):
        decode([b"volume"])
    with pytest.raises(MessageError, match="unknown message kind"):
        decode([b"x", json.dumps({"v": "1.0", "kind": "nope", "body": {}}).encode()])


def test_object_arrays_and_nan_values_cannot_be_sent() -> None:
    with pytest.raises(MessageError, match="cannot go on the wire"):
        encode(Message(Result("qc", None, None, arrays={"o": np.array([object()])})))
    with pytest.raises(MessageError, match="use None for n/a"):
        encode(Message(Result("qc", None, None, values={"fd": float("nan")})))


def test_volume_must_be_3d_float32(new_volume: NewVolume) -> None:
    with pytest.raises(MessageError, match="3-D float32"):
        encode(Message(new_volume(0, data=np.zeros((2, 2, 2), dtype=np.float64))))


# --------------------------------------------------------------------------- sockets


def test_inproc_roundtrip_is_zero_copy(
    ctx: zmq.Context[zmq.Socket[bytes]], new_volume: NewVolume
) -> None:
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for s in (push, pull):
        s.linger = 0
    pull.bind("inproc://codec-zero-copy")
    push.connect("inproc://codec-zero-copy")
    vol = new_volume(5, shape=(90, 90, 60))
    send(push, Message(vol))
    assert pull.poll(5000)
    back = recv(pull)
    assert isinstance(back.payload, Volume)
    # Over inproc with copy=False the received buffer is the sender's array.
    assert np.shares_memory(back.payload.data, vol.data)
    assert not back.payload.data.flags.writeable
    assert_same_volume(vol, back.payload)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_socket_roundtrip_every_kind(
    ctx: zmq.Context[zmq.Socket[bytes]],
    new_volume: NewVolume,
    new_series: NewSeries,
    transport: str,
    tmp_path: Any,
) -> None:
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    for s in (push, pull):
        s.linger = 0
    pull.bind("tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{tmp_path}/c")
    push.connect(pull.get(zmq.LAST_ENDPOINT).decode())
    series = new_series()
    sent = [
        Message(SeriesStart(series, 1.0)),
        Message(new_volume(0, series=series, shape=(64, 64, 36))),
        Message(VolumeIncomplete(series, 1, 3, 4, 2.0, 3.0)),
        Message(Result("motion", series, 0, {"fd": 0.1}, {"params": np.zeros(6)})),
        Message(Gap(series, 1, "incomplete")),
        Message(SeriesEnd(series, 4.0, 2, "complete")),
        Message(EndOfStream()),
    ]
    for m in sent:
        send(push, m)
    for m in sent:
        assert pull.poll(5000)
        got = recv(pull)
        assert got.kind == m.kind
        assert got.timestamps == m.timestamps
        if isinstance(m.payload, Volume):
            assert isinstance(got.payload, Volume)
            assert_same_volume(m.payload, got.payload)
        elif isinstance(m.payload, Result):
            assert isinstance(got.payload, Result)
            np.testing.assert_array_equal(got.payload.arrays["params"], np.zeros(6))
        else:
            assert got.payload == m.payload
