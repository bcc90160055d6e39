"""A fake pipeline publisher: a simulated scan's results on a real XPUB socket.

Publishes what the pipeline publishes (sinks/topics.py), built with the same
helpers and the real codec, over tcp://127.0.0.1 on an ephemeral port: series
start, per volume ``volume-received``, ``motion`` and ``qc`` (FD from the
simulated motion by Power's formula, usable minutes from the real
:class:`UsableData`), missing volumes as ``volume-missing`` plus ``gap``,
warnings, ``target`` messages with a correlation map, ``guidance`` made by the
real :class:`GuidanceStage` from those ``qc`` and ``target`` messages (or
given outright with :meth:`FakePublisher.guidance`), and series end.

For development, run it with a dashboard attached::

    python tests/sinks/fake_publisher.py --port 8080 --volumes 1250 --interval 0.72

then open the printed URL.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import zmq

from boldstream.analysis.qc import QCFrame
from boldstream.analysis.usable import UsableData
from boldstream.pipeline.guidance_stage import GuidanceStage
from boldstream.receiver.volume import SeriesInfo, VolumeIncomplete
from boldstream.sinks import topics
from boldstream.stream.messages import Gap, Message, Result, SeriesEnd, SeriesStart
from boldstream.stream.pubsub import Publisher

__all__ = ["FakePublisher", "fake_series", "target_map"]

SHAPE = (40, 48, 36)
VOXEL_MM = 3.0


def fake_series(
    *, session_key: str = "sess-7f3a", series_number: int = 12, tr_s: float = 0.72
) -> SeriesInfo:
    return SeriesInfo(
        series_uid=f"1.2.826.0.1.3680043.10.543.{series_number}",
        study_uid="1.2.826.0.1.3680043.10.543",
        description="rest_bold",
        session_key=session_key,
        manufacturer="SIEMENS",
        series_number=series_number,
        encoding="mosaic",
        tr_s=tr_s,
    )


def vox2ras() -> np.ndarray:
    a = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    a[:3, 3] = [-(n - 1) * VOXEL_MM / 2 for n in SHAPE]  # RAS 0 at the centre
    return a


def target_map(ras_mm: Iterable[float], *, seed: int = 0) -> np.ndarray:
    """A smooth correlation map, most negative around ``ras_mm``, NaN outside a head."""
    rng = np.random.default_rng(seed)
    ijk = np.indices(SHAPE, dtype=np.float64).reshape(3, -1)
    ras = (vox2ras() @ np.vstack([ijk, np.ones(ijk.shape[1])]))[:3].T.reshape(*SHAPE, 3)
    centre = np.asarray(list(ras_mm), dtype=np.float64)
    d2 = ((ras - centre) ** 2).sum(axis=-1)
    r = -0.45 * np.exp(-d2 / (2 * 12.0**2)) + 0.25 * np.exp(
        -((ras - np.array([6.0, 16.0, -10.0])) ** 2).sum(axis=-1) / (2 * 10.0**2)
    )
    r += 0.04 * rng.standard_normal(SHAPE)
    head = ((ras / np.array([58.0, 70.0, 52.0])) ** 2).sum(axis=-1) <= 1.0
    r[~head] = np.nan
    return r.astype(np.float32)


class FakePublisher:
    """An XPUB on tcp://127.0.0.1:<ephemeral> publishing a simulated scan."""

    def __init__(
        self,
        *,
        context: zmq.Context[Any] | None = None,
        series: SeriesInfo | None = None,
        seed: int = 0,
        missing: Iterable[int] = (),
        late: Iterable[int] = (),
        goal_minutes: float = 12.5,
    ) -> None:
        self._own_context = context is None
        self.context = context if context is not None else zmq.Context()
        socket = self.context.socket(zmq.XPUB)
        socket.linger = 0
        socket.bind("tcp://127.0.0.1:*")
        self.endpoint: str = socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.publisher = Publisher(socket, name="fake-pipeline", sndhwm=10_000)
        self.series = series or fake_series()
        tr = self.series.tr_s or 0.72
        self.usable = UsableData(tr_s=tr, goal_minutes=goal_minutes)
        self.rng = np.random.default_rng(seed)
        self.missing = set(missing)
        self.late = set(late)
        self.params = np.zeros(6)
        self._prev: np.ndarray | None = None
        self.published_volumes = 0
        self.guide = GuidanceStage(min_points=2, min_fit_minutes=0.1)

    # -- plumbing ------------------------------------------------------------------

    def wait_for_subscribers(self, n: int = 1, *, timeout: float = 10.0) -> None:
        """Block until ``n`` subscribers took every dashboard topic (slow-joiner guard)."""
        want = n * len(topics.DASHBOARD_TOPICS)
        deadline = time.monotonic() + timeout
        while self.publisher.subscriptions < want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{self.publisher.subscriptions} of {want} subscriptions after {timeout} s"
                )
            if self.publisher.socket.poll(int(min(left, 0.2) * 1000)):
                self.publisher.drain_subscriptions()

    def send(self, payload: Any, **timestamps: float) -> None:
        message = Message(payload, dict(timestamps))
        if isinstance(payload, SeriesEnd):
            for guidance in self.guide.observe(message):
                self.publisher.publish(guidance)
        self.publisher.publish(message)
        if not isinstance(payload, SeriesEnd):
            for guidance in self.guide.observe(message):
                self.publisher.publish(guidance)

    def guidance(self, index: int, values: dict[str, Any]) -> Result:
        """Publish one ``guidance`` result as given."""
        result = topics.guidance_result(self.series, index, values)
        self.publisher.publish(Message(result))
        return result

    def close(self) -> None:
        self.publisher.socket.close(linger=0)
        if self._own_context:
            self.context.term()

    # -- the scan --------------------------------------------------------------------

    def start_series(self) -> None:
        self.send(SeriesStart(self.series, time.time()))

    def end_series(self, n_volumes: int | None = None) -> None:
        self.send(SeriesEnd(self.series, time.time(), n_volumes=n_volumes, reason="complete"))

    def _motion_step(self, index: int) -> np.ndarray:
        drift = np.array([0.002, -0.001, 0.004, 0.00002, 0.00001, -0.00003])
        noise = self.rng.normal(0.0, [0.02, 0.02, 0.03, 0.0003, 0.0003, 0.0002])
        self.params = self.params + drift + noise
        if index % 97 == 50:  # a spike the FD chart and the outliers tile show
            self.params = self.params + np.array([0.6, -0.3, 0.4, 0.006, 0.0, 0.004])
        return self.params.copy()

    def volume(self, index: int) -> None:
        """Publish volume ``index`` (or its absence) and its results."""
        s = self.series
        now = time.time()
        if index in self.missing or index in self.late:
            if index in self.missing:
                self.send(
                    VolumeIncomplete(s, index, 20, 36, now - 2.0, now, "timeout: slices missing")
                )
                self.send(Gap(s, index, "incomplete"))
            else:
                self.send(Gap(s, index, "timeout"))
            self.send(
                topics.warning_result(
                    s, index, f"volume {index} did not arrive", code="volume-missing"
                )
            )
            return
        received = now - 0.05
        self.send(
            topics.volume_received_result(
                s, index, shape=SHAPE, voxel_mm=(VOXEL_MM,) * 3, assembly_ms=3.2, instances=1
            ),
            received=received,
            assembled=received + 0.003,
        )
        params = self._motion_step(index)
        self.send(
            topics.motion_result(
                s,
                index,
                params.tolist(),
                flagged=False,
                reason=None,
                iterations=4,
                correlation=0.98,
            ),
            received=received,
        )
        fd: float | None = None
        if self._prev is not None:
            d = np.abs(params - self._prev)
            fd = float(d[:3].sum() + 50.0 * d[3:].sum())
        self._prev = params
        summary = self.usable.add(fd)
        std_dvars = (
            None if index < 5 else float(1.0 + 0.1 * self.rng.standard_normal() + 2.0 * (fd or 0))
        )
        reasons = tuple(
            r
            for r, bad in (("fd", (fd or 0.0) > 0.5), ("std_dvars", (std_dvars or 0.0) > 1.5))
            if bad
        )
        frame = QCFrame(
            index=index,
            fd_mm=fd,
            dvars=None
            if index == 0
            else float(18.0 + 3.0 * self.rng.standard_normal() + 40 * (fd or 0)),
            std_dvars=std_dvars,
            global_signal=float(812.0 + self.rng.standard_normal()),
            tsnr_median=None if index < 2 else float(62.0 - 40.0 / (index + 1)),
            outlier=bool(reasons),
            outlier_reasons=reasons,
            usable=summary,
        )
        latency_ms = float(140.0 + 40.0 * abs(self.rng.standard_normal()))
        self.send(topics.qc_result(s, index, frame, latency_ms=latency_ms), received=received)
        self.published_volumes += 1

    def target(
        self,
        index: int,
        *,
        status: topics.TargetStatus = "provisional",
        ras_mm: tuple[float, float, float] = (-36.0, 30.0, 28.0),
        p_value: float | None = 0.004,
        held_s: float | None = None,
        reasons: list[str] | None = None,
    ) -> Result:
        good = self.usable.summary().thresholds[0].minutes
        result = topics.target_result(
            self.series,
            index,
            {
                "status": status,
                "ras_mm": list(ras_mm),
                "mni_mm": [ras_mm[0] + 1.5, ras_mm[1] - 2.0, ras_mm[2] + 3.0],
                "split_half_mm": max(2.0, 20.0 - good * 2.0),
                "drift_mm": max(0.5, 8.0 - good),
                "good_minutes": good,
                "p_value": p_value,
                "held_s": held_s,
                "reasons": reasons or [],
                "rule": "cash2021-cluster",
            },
            correlation_map=target_map(ras_mm, seed=index),
            vox2ras=vox2ras(),
        )
        self.send(result)
        return result

    def scan(
        self,
        n_volumes: int,
        *,
        interval_s: float = 0.0,
        target_every: int = 0,
        start: int = 0,
    ) -> None:
        """Volumes ``start``..``start + n_volumes - 1``, a target every ``target_every``."""
        next_at = time.monotonic()
        for index in range(start, start + n_volumes):
            self.volume(index)
            if target_every and index > 0 and index % target_every == 0:
                good = self.usable.summary().thresholds[0].minutes
                status: topics.TargetStatus = (
                    "stable" if good > 10 else "settling" if good > 5 else "provisional"
                )
                self.target(index, status=status)
            if interval_s > 0:
                next_at += interval_s
                time.sleep(max(0.0, next_at - time.monotonic()))


def main() -> int:
    from boldstream.logs import configure_logging
    from boldstream.sinks.dashboard import Dashboard

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="dashboard port (0: any free)")
    parser.add_argument("--volumes", type=int, default=1250)
    parser.add_argument("--interval", type=float, default=0.72, help="seconds between volumes")
    parser.add_argument("--target-every", type=int, default=60)
    args = parser.parse_args()
    configure_logging(level="info")
    pub = FakePublisher(missing={33, 34}, late={120})
    dashboard = Dashboard(pub.endpoint, host=args.host, port=args.port)
    dashboard.start()
    print(f"dashboard on {dashboard.url} (publisher {pub.endpoint})", flush=True)
    try:
        pub.wait_for_subscribers()
        pub.start_series()
        pub.scan(args.volumes, interval_s=args.interval, target_every=args.target_every)
        pub.end_series(args.volumes)
        print("scan finished; Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        dashboard.stop()
        pub.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
