"""send_run into boldstream's own Receiver on 127.0.0.1: what arrives assembles.

The sender's network behaviour against a bare pynetdicom SCP is in
test_send_loopback.py; here the peer is the real receiver (SCP, spool,
ingest, assembler), so the checks are on assembled volumes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from simulator.sim_support import LiveReceiver

from boldstream.receiver.volume import Volume
from boldstream.simulator.encode import ENCODINGS, SeriesSpec, quantise
from boldstream.simulator.phantom import PhantomRun, SimulatorError, make_phantom_run
from boldstream.simulator.send import SendOptions, send_run

pytestmark = pytest.mark.timeout(60)

N_VOLUMES = 4
N_SLICES = 6


@pytest.fixture(scope="module")
def run() -> PhantomRun:
    return make_phantom_run(
        n_volumes=N_VOLUMES, tr_s=1.0, shape=(16, 14, N_SLICES), voxel_mm=4.0, seed=0
    )


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveReceiver]:
    receiver = LiveReceiver(tmp_path / "spool", assembly={"volume_timeout_s": 0.5})
    try:
        yield receiver
    finally:
        receiver.stop()


def assert_is_phantom(run: PhantomRun, volume: Volume) -> None:
    assert np.array_equal(volume.data, quantise(run.volume(volume.index))), volume.index
    assert np.abs(volume.vox2ras - run.vox2ras).max() < 1e-3


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_volume_assembles(live: LiveReceiver, run: PhantomRun, encoding: str) -> None:
    options = SendOptions(encoding=encoding, timeout_s=10)  # type: ignore[arg-type]
    report = send_run(run, "127.0.0.1", live.port, options)
    instances = {"slice": N_VOLUMES * N_SLICES, "enhanced-series": 1}.get(encoding, N_VOLUMES)
    assert report.instances == instances
    assert report.statuses == {0: instances} and report.failed == 0
    volumes = live.wait_volumes(N_VOLUMES)
    assert sorted(volumes) == list(range(N_VOLUMES))
    for volume in volumes.values():
        assert_is_phantom(run, volume)
        # The report names the series the instances carried.
        assert volume.series.series_uid == report.series_uid
    assert live.incomplete() == []


def test_shuffled_duplicated_and_dropped_slices(live: LiveReceiver, run: PhantomRun) -> None:
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)
    options = SendOptions(
        encoding="slice",
        shuffle=True,
        duplicate_fraction=0.3,
        drop=frozenset({(1, 3)}),
        seed=4,
        spec=spec,
        timeout_s=10,
    )
    report = send_run(run, "127.0.0.1", live.port, options)
    unique = N_VOLUMES * N_SLICES - 1
    assert report.failed == 0
    assert report.instances > unique, "duplicate_fraction=0.3 sent no duplicate"
    # The dropped slice's volume is reported missing after the (short) timeout.
    live.wait_for(lambda events: len(events) >= N_VOLUMES)
    volumes = live.volumes()
    assert sorted(volumes) == [0, 2, 3]
    (missing,) = live.incomplete()
    assert missing.index == 1
    assert (missing.slices_received, missing.slices_expected) == (N_SLICES - 1, N_SLICES)
    # Duplicates are acknowledged, stored once and assembled once.
    stats = live.scp_stats
    assert stats["accepted"] == unique
    assert stats["duplicates"] == report.instances - unique
    spooled = list((live.receiver.spool.root).rglob("*.dcm"))
    assert len(spooled) == unique
    for volume in volumes.values():
        assert len(set(volume.instance_uids)) == N_SLICES
        assert volume.series.series_uid == spec.series_uid
        assert_is_phantom(run, volume)


def test_three_parallel_associations_deliver_everything(
    live: LiveReceiver, run: PhantomRun
) -> None:
    options = SendOptions(encoding="slice", associations=3, timeout_s=10)
    report = send_run(run, "127.0.0.1", live.port, options)
    assert report.statuses == {0: N_VOLUMES * N_SLICES}
    volumes = live.wait_volumes(N_VOLUMES)
    for volume in volumes.values():
        assert_is_phantom(run, volume)
    assert live.scp_stats["associations"] == 3
    assert live.scp_stats["accepted"] == N_VOLUMES * N_SLICES


@pytest.mark.parametrize("associations", [1, 2])
def test_refused_calling_ae_title_is_a_readable_error(
    tmp_path: Path, run: PhantomRun, associations: int
) -> None:
    live = LiveReceiver(tmp_path / "spool", receiver={"allowed_calling_aets": ["CONSOLE"]})
    try:
        options = SendOptions(calling_aet="SIMSCANNER", associations=associations, timeout_s=10)
        with pytest.raises(SimulatorError, match=r"cannot associate with BOLDSTREAM .*rejected"):
            send_run(run, "127.0.0.1", live.port, options)
        assert live.scp_stats["accepted"] == 0
    finally:
        live.stop()
    assert live.events == []


def test_pace_releases_volume_t_at_t_tr_over_pace(live: LiveReceiver, run: PhantomRun) -> None:
    pace = 5.0
    interval = run.tr_s / pace
    started = time.time()
    report = send_run(run, "127.0.0.1", live.port, SendOptions(pace=pace, timeout_s=10))
    volumes = live.wait_volumes(N_VOLUMES)
    # Not before its due time (5 ms for time.time vs the sender's monotonic clock) ...
    for t, volume in volumes.items():
        assert volume.first_received >= started + t * interval - 0.005, (t, volume.first_received)
    assert report.elapsed_s >= (N_VOLUMES - 1) * interval - 0.005
    # ... and not held back for long either (generous: shared CI machines).
    assert report.elapsed_s < (N_VOLUMES - 1) * interval + 5.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pace": 0.0}, "pace must be a positive"),
        ({"associations": 0}, "associations must be at least 1"),
        ({"duplicate_fraction": 1.5}, r"duplicate_fraction must be in \[0, 1\]"),
        ({"encoding": "jpeg"}, "encoding must be one of mosaic, slice"),
    ],
)
def test_bad_options_are_refused_before_connecting(
    run: PhantomRun, change: dict[str, object], message: str
) -> None:
    options = SendOptions(**change)  # type: ignore[arg-type]
    # Port 9 (discard) on loopback: nothing listens, and nothing must be tried.
    with pytest.raises(SimulatorError, match=message):
        send_run(run, "127.0.0.1", 9, options)
