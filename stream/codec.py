"""One wire format for every socket: ``[topic, json header, raw buffer, ...]``.

- Frame 0, the topic (UTF-8), is what SUB sockets filter on.
- Frame 1 is a UTF-8 JSON object: the schema version ``v`` ("major.minor"),
  the payload ``kind``, the ``series`` (:class:`SeriesInfo` fields, or null),
  the ``ts`` timestamps dict, the payload's other fields in ``body`` and,
  for each following frame, an entry of ``arrays`` giving its ``name``,
  ``dtype`` (NumPy type string with explicit byte order, e.g. ``"<f4"`` or
  ``">f4"``), ``shape`` and memory ``order`` ("C" or "F").
- Frames 2.. are the raw array buffers, sent with ``copy=False``: a C- or
  Fortran-contiguous array goes out without a copy, any other layout is made
  C-contiguous first. Byte order is kept as sent and stated in ``dtype``.

No pickle anywhere: a header is JSON, an array is bytes plus its description.
A reader accepts any minor version of the major version it knows (unknown
fields are ignored) and rejects other majors with :class:`MessageError`.

Decoding is zero-copy: arrays are :func:`numpy.frombuffer` views on the
received :class:`zmq.Frame` buffers, made read-only (over ``inproc://`` the
buffer is the sender's own memory). The exceptions, which copy: a buffer that
is not aligned for its dtype (libzmq can hand small frames at odd offsets),
and a volume whose float32 data arrived in non-native byte order (a
:class:`~boldstream.receiver.Volume` promises native float32).

pyzmq copies frames below ``zmq.COPY_THRESHOLD`` (64 kB) even with
``copy=False``, which is cheaper than zero-copy bookkeeping for small
buffers; volumes (0.6 MB for 64x64x36, 1.9 MB for 90x90x60) are above it.

A sender must not modify an array after sending it with ``copy=False``; the
pipeline treats volumes and results as immutable, which makes this safe.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import numpy.typing as npt
import zmq

from boldstream.errors import StreamError
from boldstream.receiver.volume import SeriesInfo, Volume, VolumeIncomplete
from boldstream.stream.messages import (
    EndOfStream,
    Gap,
    Message,
    Result,
    SeriesEnd,
    SeriesStart,
)

__all__ = [
    "SCHEMA_VERSION",
    "MessageError",
    "decode",
    "encode",
    "recv",
    "send",
]

#: Version written in every header. Bump the minor for added optional fields,
#: the major for anything an older reader would misread.
SCHEMA_VERSION = "1.0"
_MAJOR = 1

_DTYPE_RE = re.compile(r"^[<>|=][biufc][0-9]{1,2}$")
_MAX_NDIM = 32
_SERIES_FIELDS = tuple(f.name for f in fields(SeriesInfo))

Frame = zmq.Frame | bytes | bytearray | memoryview


class MessageError(StreamError, ValueError):
    """A message cannot be encoded or decoded; the text says which part and why."""


# --------------------------------------------------------------------------- arrays


def _array_out(name: str, array: npt.NDArray[Any]) -> tuple[dict[str, Any], npt.NDArray[Any]]:
    """Header entry and a contiguous 1-D buffer for ``array`` (a view when possible)."""
    if not isinstance(array, np.ndarray):
        raise MessageError(f"array {name!r}: expected a numpy array, got {type(array).__name__}")
    dtype = array.dtype
    if dtype.fields is not None or dtype.kind not in "biufc":
        raise MessageError(
            f"array {name!r}: dtype {dtype} cannot go on the wire "
            "(only bool, integer, float and complex arrays)"
        )
    if array.flags.c_contiguous:
        order, buffer = "C", array.reshape(-1)
    elif array.flags.f_contiguous:
        order, buffer = "F", array.ravel(order="F")
    else:
        order, buffer = "C", np.ascontiguousarray(array).reshape(-1)
    spec = {
        "name": name,
        "dtype": dtype.str,
        "shape": [int(n) for n in array.shape],
        "order": order,
    }
    return spec, buffer


def _array_in(spec: Any, frame: Frame, position: int) -> tuple[str, npt.NDArray[Any]]:
    """Rebuild one array from its header entry and frame, checking every size."""
    if not isinstance(spec, dict):
        raise MessageError(f"arrays[{position}]: expected an object, got {spec!r}")
    name = spec.get("name")
    where = f"array {name!r} (frame {position + 2})"
    dtype_str, shape, order = spec.get("dtype"), spec.get("shape"), spec.get("order", "C")
    if not isinstance(name, str):
        raise MessageError(f"arrays[{position}]: 'name' must be a string, got {name!r}")
    if not isinstance(dtype_str, str) or not _DTYPE_RE.match(dtype_str):
        raise MessageError(f"{where}: unsupported dtype {dtype_str!r}")
    try:
        dtype = np.dtype(dtype_str)
    except TypeError as exc:
        raise MessageError(f"{where}: unsupported dtype {dtype_str!r}") from exc
    if (
        not isinstance(shape, list)
        or len(shape) > _MAX_NDIM
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
    ):
        raise MessageError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if order not in ("C", "F"):
        raise MessageError(f"{where}: order must be 'C' or 'F', got {order!r}")
    buffer = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    expected = math.prod(shape) * dtype.itemsize
    if buffer.nbytes != expected:
        raise MessageError(
            f"{where}: buffer holds {buffer.nbytes} bytes but dtype {dtype_str} "
            f"x shape {tuple(shape)} needs {expected}"
        )
    flat = np.frombuffer(buffer, dtype=dtype)
    if not flat.flags.aligned:
        flat = flat.copy()
    array = flat.reshape(shape[::-1]).T if order == "F" else flat.reshape(shape)
    array.flags.writeable = False
    return name, array


# --------------------------------------------------------------------------- json parts


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.size <= 64:
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-able")


def _series_out(series: SeriesInfo) -> dict[str, Any]:
    out = {name: getattr(series, name) for name in _SERIES_FIELDS}
    if series.slice_timing is not None:
        out["slice_timing"] = list(series.slice_timing)
    return out


def _series_in(raw: Any) -> SeriesInfo:
    if not isinstance(raw, dict):
        raise MessageError(f"header 'series': expected an object, got {raw!r}")
    known = {k: v for k, v in raw.items() if k in _SERIES_FIELDS}
    if known.get("slice_timing") is not None:
        known["slice_timing"] = tuple(map(float, known["slice_timing"]))
    try:
        return SeriesInfo(**known)
    except TypeError as exc:
        raise MessageError(f"header 'series': {exc}") from exc


def _affine_out(name: str, affine: npt.NDArray[Any]) -> list[list[float]]:
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise MessageError(f"affine {name!r}: expected a finite 4x4 matrix, got shape {a.shape}")
    rows: list[list[float]] = a.tolist()
    return rows


def _affine_in(name: str, raw: Any) -> npt.NDArray[np.float64]:
    try:
        a = np.array(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"affine {name!r}: not a 4x4 matrix of numbers") from exc
    if a.shape != (4, 4):
        raise MessageError(f"affine {name!r}: expected 4x4, got shape {a.shape}")
    a.flags.writeable = False
    return a


@functools.lru_cache(maxsize=256)
def _series_json(series: SeriesInfo) -> str:
    """A series' JSON, cached: its slice times are most of a header's encoding cost."""
    try:
        return json.dumps(_series_out(series), separators=(",", ":"), allow_nan=False)
    except ValueError as exc:
        raise MessageError(f"series {series.series_uid}: not JSON-able ({exc})") from exc


# --------------------------------------------------------------------------- encode


def encode(message: Message) -> list[Any]:
    """Frames for ``message``: ``[topic, header, *buffers]``, ready for ``copy=False``.

    Raises :class:`MessageError` for a payload that cannot go on the wire
    (object arrays, NaN in result values, a volume that is not 3-D float32).
    """
    p = message.payload
    body: dict[str, Any]
    arrays: list[tuple[str, npt.NDArray[Any]]] = []
    if isinstance(p, Volume):
        if p.data.dtype.kind != "f" or p.data.dtype.itemsize != 4 or p.data.ndim != 3:
            raise MessageError(
                f"volume {p.index}: data must be 3-D float32, got {p.data.dtype} "
                f"with shape {p.data.shape}"
            )
        body = {
            "index": p.index,
            "acquisition_time": p.acquisition_time,
            "first_received": p.first_received,
            "last_received": p.last_received,
            "assembled": p.assembled,
            "instance_uids": list(p.instance_uids),
            "vox2ras": _affine_out("vox2ras", p.vox2ras),
        }
        arrays.append(("data", p.data))
    elif isinstance(p, VolumeIncomplete):
        body = {
            "index": p.index,
            "slices_received": p.slices_received,
            "slices_expected": p.slices_expected,
            "first_received": p.first_received,
            "reported": p.reported,
            "reason": p.reason,
        }
    elif isinstance(p, SeriesStart):
        body = {"started": p.started}
    elif isinstance(p, SeriesEnd):
        body = {
            "ended": p.ended,
            "n_volumes": p.n_volumes,
            "reason": p.reason,
        }
    elif isinstance(p, Gap):
        body = {"index": p.index, "reason": p.reason}
    elif isinstance(p, Result):
        body = {
            "topic": p.topic,
            "index": p.index,
            "values": dict(p.values),
            "affines": {k: _affine_out(k, v) for k, v in p.affines.items()},
        }
        arrays.extend(p.arrays.items())
    elif isinstance(p, EndOfStream):
        body = {"reason": p.reason}
    else:  # pragma: no cover - the Payload union is closed
        raise MessageError(f"cannot encode a {type(p).__name__}")

    specs: list[dict[str, Any]] = []
    buffers: list[npt.NDArray[Any]] = []
    for name, array in arrays:
        spec, buffer = _array_out(name, array)
        specs.append(spec)
        buffers.append(buffer)
    header: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "kind": message.kind,
        "ts": message.timestamps,
        "body": body,
        "arrays": specs,
    }
    if message.seq is not None:
        header["seq"] = message.seq
        header["pub"] = message.publisher
    try:
        text = json.dumps(header, separators=(",", ":"), allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise MessageError(
            f"{message.kind} header is not JSON-able ({exc}); result values must be "
            "JSON types without NaN or infinity (use None for n/a)"
        ) from exc
    # The series goes first, spliced in from the cache (same JSON as dumping it).
    series = message.series
    series_text = "null" if series is None else _series_json(series)
    return [message.topic.encode(), f'{{"series":{series_text},{text[1:]}'.encode(), *buffers]


# --------------------------------------------------------------------------- decode


def _check_version(header: dict[str, Any]) -> None:
    version = header.get("v")
    if not isinstance(version, str):
        raise MessageError(f"header has no schema version 'v' (got {version!r})")
    major, _, _minor = version.partition(".")
    if not major.isdigit() or int(major) != _MAJOR:
        raise MessageError(
            f"unsupported schema version {version!r}: this build reads {_MAJOR}.x "
            f"(writes {SCHEMA_VERSION}); upgrade the older side of the pipeline"
        )


def _field(body: dict[str, Any], name: str, kind: str) -> Any:
    try:
        return body[name]
    except KeyError:
        raise MessageError(f"{kind} body lacks field {name!r}") from None


def decode(frames: Sequence[Frame]) -> Message:
    """Rebuild a :class:`Message` from received frames (``recv_multipart(copy=False)``).

    Raises :class:`MessageError` naming the problem: too few frames, header not
    JSON, unknown schema major or kind, array count or size mismatch.
    """
    if len(frames) < 2:
        raise MessageError(f"expected at least 2 frames [topic, header], got {len(frames)}")
    raw = frames[1]
    header_bytes = raw.bytes if isinstance(raw, zmq.Frame) else bytes(raw)
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"header (frame 1) is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise MessageError(f"header (frame 1) must be a JSON object, got {type(header).__name__}")
    _check_version(header)
    kind = header.get("kind")
    body = header.get("body")
    if not isinstance(body, dict):
        raise MessageError(f"{kind} header lacks its 'body' object")
    specs = header.get("arrays", [])
    if not isinstance(specs, list):
        raise MessageError(f"{kind} header: 'arrays' must be a list")
    if len(specs) != len(frames) - 2:
        raise MessageError(
            f"{kind} header describes {len(specs)} array(s) but {len(frames) - 2} "
            "buffer frame(s) followed"
        )
    arrays = dict(_array_in(spec, frames[i + 2], i) for i, spec in enumerate(specs))
    timestamps = header.get("ts", {})
    if not isinstance(timestamps, dict):
        raise MessageError(f"{kind} header: 'ts' must be an object")

    payload: Any
    try:
        if kind == "volume":
            data = arrays.get("data")
            if data is None or data.ndim != 3 or data.dtype.kind != "f" or data.itemsize != 4:
                raise MessageError("volume: needs one 3-D float32 array named 'data'")
            if not data.dtype.isnative:
                data = data.astype(np.float32)
                data.flags.writeable = False
            payload = Volume(
                data=data,
                vox2ras=_affine_in("vox2ras", _field(body, "vox2ras", kind)),
                series=_series_in(_field(header, "series", kind)),
                index=int(_field(body, "index", kind)),
                acquisition_time=body.get("acquisition_time"),
                first_received=float(_field(body, "first_received", kind)),
                last_received=float(_field(body, "last_received", kind)),
                assembled=float(_field(body, "assembled", kind)),
                instance_uids=tuple(body.get("instance_uids", ())),
            )
        elif kind == "volume-missing":
            payload = VolumeIncomplete(
                series=_series_in(_field(header, "series", kind)),
                index=int(_field(body, "index", kind)),
                slices_received=int(_field(body, "slices_received", kind)),
                slices_expected=body.get("slices_expected"),
                first_received=float(_field(body, "first_received", kind)),
                reported=float(_field(body, "reported", kind)),
                reason=str(body.get("reason", "")),
            )
        elif kind == "series-start":
            payload = SeriesStart(
                series=_series_in(_field(header, "series", kind)),
                started=float(_field(body, "started", kind)),
            )
        elif kind == "series-end":
            payload = SeriesEnd(
                series=_series_in(_field(header, "series", kind)),
                ended=float(_field(body, "ended", kind)),
                n_volumes=body.get("n_volumes"),
                reason=str(body.get("reason", "")),
            )
        elif kind == "gap":
            reason = _field(body, "reason", kind)
            if reason not in ("incomplete", "timeout", "series-end"):
                raise MessageError(f"gap: unknown reason {reason!r}")
            payload = Gap(
                series=_series_in(_field(header, "series", kind)),
                index=int(_field(body, "index", kind)),
                reason=reason,
            )
        elif kind == "result":
            series_raw = header.get("series")
            values = body.get("values", {})
            affines = body.get("affines", {})
            if not isinstance(values, dict) or not isinstance(affines, dict):
                raise MessageError("result: 'values' and 'affines' must be objects")
            index = body.get("index")
            payload = Result(
                topic=str(_field(body, "topic", kind)),
                series=None if series_raw is None else _series_in(series_raw),
                index=None if index is None else int(index),
                values=values,
                arrays=arrays,
                affines={k: _affine_in(k, v) for k, v in affines.items()},
            )
        elif kind == "end-of-stream":
            payload = EndOfStream(reason=str(body.get("reason", "")))
        else:
            raise MessageError(f"unknown message kind {kind!r}")
    except (TypeError, ValueError) as exc:
        if isinstance(exc, MessageError):
            raise
        raise MessageError(f"{kind} body is malformed: {exc}") from exc

    seq = header.get("seq")
    publisher = header.get("pub")
    return Message(
        payload,
        {str(k): float(v) for k, v in timestamps.items()},
        seq=int(seq) if seq is not None else None,
        publisher=str(publisher) if publisher is not None else None,
    )


# --------------------------------------------------------------------------- sockets


def send(socket: zmq.Socket[Any], message: Message, *, flags: int = 0) -> None:
    """Encode ``message`` and send it as one multipart message with ``copy=False``."""
    socket.send_multipart(encode(message), flags=flags, copy=False)


def recv(socket: zmq.Socket[Any], *, flags: int = 0) -> Message:
    """Receive one multipart message without copying and decode it."""
    frames = socket.recv_multipart(flags=flags, copy=False)
    return decode(frames)
