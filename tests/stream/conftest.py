"""Fixtures for the pipeline tests: a shared zmq context and message factories."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import zmq

from boldstream.receiver.volume import SeriesInfo, Volume


class _TrackingContext(zmq.Context[zmq.Socket[bytes]]):
    """Keeps every socket it made so that teardown closes them (no ResourceWarning
    from a socket garbage-collected while a stage thread still runs)."""

    made: list[zmq.Socket[bytes]]

    def socket(self, socket_type: int, **kwargs: object) -> zmq.Socket[bytes]:  # type: ignore[override]
        s: zmq.Socket[bytes] = super().socket(socket_type, **kwargs)  # type: ignore[arg-type]
        self.made.append(s)
        return s


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context = _TrackingContext()
    context.made = []
    yield context
    for s in context.made:
        s.close(linger=0)
    context.destroy(linger=0)


def make_series(session_key: str = "sess-a", uid: str = "1.2.3.4") -> SeriesInfo:
    return SeriesInfo(
        series_uid=uid,
        study_uid="1.2.3",
        description="rest",
        session_key=session_key,
        manufacturer="SIEMENS",
        series_number=7,
        encoding="mosaic",
        tr_s=0.8,
        slice_timing=(0.0, 0.4, 0.1, 0.5),
        slices_per_volume=4,
    )


def make_volume(
    index: int,
    *,
    series: SeriesInfo | None = None,
    shape: tuple[int, int, int] = (8, 7, 4),
    data: np.ndarray | None = None,
) -> Volume:
    now = time.time()
    arr = (
        data
        if data is not None
        else np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1000 * index
    )
    vox2ras = np.diag([2.4, 2.4, 2.4, 1.0])
    vox2ras[:3, 3] = [-100.5, -110.25, -60.0]
    return Volume(
        data=arr,
        vox2ras=vox2ras,
        series=series or make_series(),
        index=index,
        acquisition_time=36000.0 + 0.8 * index,
        first_received=now - 0.01,
        last_received=now - 0.005,
        assembled=now,
        instance_uids=(f"1.2.3.4.{index}",),
    )


@pytest.fixture
def new_series() -> Callable[..., SeriesInfo]:
    """``new_series(session_key, uid)`` builds a SeriesInfo."""
    return make_series


@pytest.fixture
def new_volume() -> Callable[..., Volume]:
    """``new_volume(index, series=..., shape=..., data=...)`` builds a Volume."""
    return make_volume
