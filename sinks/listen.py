"""A reference subscriber: the live result stream as lines of text.

:func:`describe` turns one decoded message into one readable line (time,
topic, series, volume and the numbers that matter for that topic);
:func:`json_line` turns the raw frames into one JSON object per line (the
header exactly as published, plus ``topic``; array buffers are described in
``arrays``, not printed). :func:`listen` runs the loop behind
``boldstream listen``.

Series appear under their pseudonymous ``session_key`` and series number; the
UIDs are left out of readable lines.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TextIO

import zmq

from boldstream.errors import ConfigError
from boldstream.receiver.volume import VolumeIncomplete
from boldstream.stream.codec import MessageError, decode
from boldstream.stream.curve import CurveClient
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, SeriesStart

__all__ = ["DEFAULT_ENDPOINT", "check_endpoint", "describe", "json_line", "listen"]

#: The pipeline's default publisher (``pipeline.pub``).
DEFAULT_ENDPOINT: Final = "tcp://127.0.0.1:11120"

_ENDPOINT_RE = re.compile(
    r"^(tcp://[^\s:]+:[0-9]{1,5}|tcp://\[[0-9A-Fa-f:.]+\]:[0-9]{1,5}|ipc://\S+)$"
)


def check_endpoint(endpoint: str) -> str:
    """``endpoint`` if a subscriber can connect to it, else :class:`ConfigError`."""
    if not _ENDPOINT_RE.match(endpoint):
        raise ConfigError(
            f"--endpoint {endpoint!r}: expected tcp://HOST:PORT (e.g. tcp://127.0.0.1:11120) "
            "or ipc://PATH"
        )
    if endpoint.startswith("tcp://") and not 0 < int(endpoint.rsplit(":", 1)[1]) < 65536:
        raise ConfigError(f"--endpoint {endpoint!r}: port must be 1-65535")
    return endpoint


def _num(value: Any, fmt: str = ".3f", unit: str = "") -> str:
    if value is None or isinstance(value, bool):
        return "n/a"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    return f"{x:{fmt}}{unit}" if math.isfinite(x) else "n/a"


def _vec(value: Any, fmt: str = ".1f") -> str:
    if not isinstance(value, Sequence) or isinstance(value, str):
        return "n/a"
    return "(" + ", ".join(_num(v, fmt) for v in value) + ")"


def _motion(v: Mapping[str, Any]) -> str:
    trans = " ".join(_num(v.get(k), "+.3f") for k in ("trans_x", "trans_y", "trans_z"))
    rot = " ".join(
        _num(None if v.get(k) is None else math.degrees(float(v[k])), "+.3f")
        for k in ("rot_x", "rot_y", "rot_z")
    )
    text = f"trans {trans} mm  rot {rot} deg"
    if v.get("flagged"):
        text += f"  FLAGGED ({v.get('reason')})"
    return text


def _qc(v: Mapping[str, Any]) -> str:
    text = (
        f"FD {_num(v.get('fd_mm'), '.3f', ' mm')}  DVARS {_num(v.get('dvars'), '.1f')}  "
        f"stdDVARS {_num(v.get('std_dvars'), '.2f')}  tSNR {_num(v.get('tsnr_median'), '.1f')}"
    )
    usable = v.get("usable")
    if isinstance(usable, Mapping):
        thresholds = usable.get("thresholds") or []
        if thresholds and isinstance(thresholds[0], Mapping):
            first = thresholds[0]
            text += (
                f"  good {_num(first.get('minutes'), '.2f')} min"
                f" @FD<{_num(first.get('fd_threshold_mm'), '.1f')}"
            )
    if v.get("outlier"):
        text += f"  OUTLIER ({','.join(map(str, v.get('outlier_reasons') or []))})"
    latency = v.get("latency_ms")
    if latency is not None:
        text += f"  latency {_num(latency, '.0f', ' ms')}"
    return text


def _target(v: Mapping[str, Any]) -> str:
    return (
        f"{str(v.get('status', '?')).upper()}  RAS {_vec(v.get('ras_mm'))} mm  "
        f"MNI {_vec(v.get('mni_mm'))}  split-half {_num(v.get('split_half_mm'), '.1f', ' mm')}  "
        f"drift {_num(v.get('drift_mm'), '.1f', ' mm')}  "
        f"good {_num(v.get('good_minutes'), '.1f', ' min')}"
    )


def _volume_received(v: Mapping[str, Any]) -> str:
    shape = "x".join(str(n) for n in v.get("shape") or [])
    assembly = _num(v.get("assembly_ms"), ".1f", " ms")
    return f"{shape} voxels {_vec(v.get('voxel_mm'), '.2f')} mm  assembly {assembly}"


def _generic(v: Mapping[str, Any]) -> str:
    return json.dumps(dict(v), default=str)[:200]


_RESULTS: Final[dict[str, Callable[[Mapping[str, Any]], str]]] = {
    "motion": _motion,
    "qc": _qc,
    "target": _target,
    "volume-received": _volume_received,
    "warning": lambda v: f"[{v.get('code')}] {v.get('message')}",
}


def describe(message: Message) -> str:
    """One readable line for ``message``."""
    stamp = message.timestamps.get("published", time.time())
    clock = time.strftime("%H:%M:%S", time.localtime(stamp)) + f".{int(stamp % 1 * 1000):03d}"
    series = message.series
    who = "-"
    if series is not None:
        who = series.session_key + (f" #{series.series_number}" if series.series_number else "")
    index = message.index
    where = f"vol {index:>4}" if index is not None else " " * 8
    p = message.payload
    if isinstance(p, Result):
        fmt = _RESULTS.get(p.topic, _generic)
        body = fmt(p.values)
        if p.arrays:
            body += "  arrays " + ", ".join(
                f"{k}[{'x'.join(map(str, a.shape))}]" for k, a in p.arrays.items()
            )
    elif isinstance(p, SeriesStart):
        tr = f"TR {series.tr_s:.3f} s" if series and series.tr_s else "TR n/a"
        body = f"{series.description if series else ''!r} {tr}"
    elif isinstance(p, SeriesEnd):
        body = f"{p.reason or 'ended'}, {p.n_volumes if p.n_volumes is not None else '?'} volumes"
    elif isinstance(p, VolumeIncomplete):
        expected = p.slices_expected if p.slices_expected is not None else "?"
        body = f"{p.slices_received}/{expected} slices: {p.reason}"
    elif isinstance(p, Gap):
        body = f"skipped ({p.reason})"
    else:
        body = message.kind
    return f"{clock}  {message.topic:<16} {who:<16} {where}  {body}"


def _bytes(frame: bytes | zmq.Frame) -> bytes:
    return frame.bytes if isinstance(frame, zmq.Frame) else bytes(frame)


def json_line(frames: Sequence[bytes | zmq.Frame]) -> str:
    """The published header of ``frames`` with its ``topic``, as one JSON line."""
    topic = _bytes(frames[0]).decode("utf-8", "replace")
    try:
        header = json.loads(_bytes(frames[1]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"header (frame 1) is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise MessageError("header (frame 1) must be a JSON object")
    return json.dumps({"topic": topic, **header}, separators=(",", ":"))


def listen(
    endpoint: str,
    out: TextIO,
    *,
    topics: Sequence[str] = (),
    raw_json: bool = False,
    count: int | None = None,
    context: zmq.Context[Any] | None = None,
    on_error: Callable[[str], None] | None = None,
    curve: CurveClient | None = None,
) -> int:
    """Print each message from ``endpoint`` to ``out`` until ``count`` or Ctrl-C.

    ``topics`` are prefixes to subscribe to (none: everything). Returns the
    number of messages printed. A message that cannot be decoded is reported
    through ``on_error`` and skipped. ``curve``: connect as a CurveZMQ client
    (a CURVE publisher sends nothing to a subscriber without its public key).
    """
    check_endpoint(endpoint)
    ctx = context if context is not None else zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    if curve is not None:
        curve.apply(sub)
    try:
        for topic in topics or ("",):
            sub.subscribe(topic.encode())
        try:
            sub.connect(endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(f"--endpoint {endpoint!r}: {exc}") from exc
        printed = 0
        while count is None or printed < count:
            if not sub.poll(250):
                continue
            frames = sub.recv_multipart(copy=False)
            try:
                line = json_line(frames) if raw_json else describe(decode(frames))
            except MessageError as exc:
                if on_error is not None:
                    on_error(f"undecodable message on {_bytes(frames[0])!r}: {exc}")
                continue
            out.write(line + "\n")
            out.flush()
            printed += 1
        return printed
    finally:
        sub.close(linger=0)
