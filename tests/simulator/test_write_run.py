"""write_run's folder, sent by DCMTK's storescu (a native peer) to our Receiver."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from peers import require_tool
from simulator.sim_support import LiveReceiver

from boldstream.simulator.encode import SeriesSpec, quantise
from boldstream.simulator.phantom import PhantomRun, make_phantom_run
from boldstream.simulator.send import SendOptions, iter_instances, write_run

pytestmark = pytest.mark.timeout(60)

N_VOLUMES = 3
N_SLICES = 5


@pytest.fixture(scope="module")
def run() -> PhantomRun:
    return make_phantom_run(
        n_volumes=N_VOLUMES,
        tr_s=1.0,
        shape=(16, 12, N_SLICES),
        voxel_mm=4.0,
        orientation="oblique",
        motion="mild",
        seed=0,
    )


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveReceiver]:
    receiver = LiveReceiver(tmp_path / "spool")
    try:
        yield receiver
    finally:
        receiver.stop()


def storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool("storescu"), "-aet", "SCANNER", "-aec", "BOLDSTREAM", "127.0.0.1"]
    return subprocess.run(
        [*cmd, str(port), *map(str, files)], capture_output=True, text=True, timeout=30
    )


def test_files_are_in_sending_order_with_the_truth(run: PhantomRun, tmp_path: Path) -> None:
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)
    options = SendOptions(encoding="slice", shuffle=True, duplicate_fraction=0.2, seed=3, spec=spec)
    paths = write_run(run, tmp_path / "out", options)
    assert [p.name for p in paths] == [f"{n:06d}.dcm" for n in range(len(paths))]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.dcm")) == [p.name for p in paths]
    written = [pydicom.dcmread(p) for p in paths]
    # The same shuffle and duplicates as send_run would send, in the same order.
    sent = [ds for _, instances in iter_instances(run, options) for ds in instances]
    assert [int(ds.InstanceNumber) for ds in written] == [int(ds.InstanceNumber) for ds in sent]
    numbers = [int(ds.InstanceNumber) for ds in written]
    assert sorted(set(numbers)) == list(range(1, N_VOLUMES * N_SLICES + 1))
    assert len(numbers) > len(set(numbers)), "duplicate_fraction=0.2 wrote no duplicate"
    assert numbers[:N_SLICES] != sorted(numbers[:N_SLICES]), "shuffle left volume 0 in order"
    assert {ds.SeriesInstanceUID for ds in written} == {spec.series_uid}
    assert all(ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" for ds in written)

    truth = json.loads((tmp_path / "out" / "truth.json").read_text())
    assert truth["series_uid"] == spec.series_uid
    assert truth["study_uid"] == spec.study_uid
    assert truth["n_volumes"] == N_VOLUMES
    assert truth["motion"]["parameters"] == run.truth["motion"]["parameters"]
    assert np.allclose(truth["vox2ras"], run.vox2ras)


def test_storescu_sends_the_folder_and_every_volume_assembles(
    run: PhantomRun, live: LiveReceiver, tmp_path: Path
) -> None:
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)
    paths = write_run(run, tmp_path / "out", SendOptions(encoding="mosaic", spec=spec))
    assert len(paths) == N_VOLUMES
    out = storescu(live.port, paths)
    assert out.returncode == 0, out.stdout + out.stderr
    volumes = live.wait_volumes(N_VOLUMES)
    assert sorted(volumes) == list(range(N_VOLUMES))
    for t, volume in volumes.items():
        assert volume.series.series_uid == spec.series_uid
        assert np.array_equal(volume.data, quantise(run.volume(t)))
        assert np.abs(volume.vox2ras - run.vox2ras).max() < 1e-3
    assert live.scp_stats["accepted"] == N_VOLUMES


def test_storescu_sends_shuffled_slices_and_duplicates(
    run: PhantomRun, live: LiveReceiver, tmp_path: Path
) -> None:
    options = SendOptions(encoding="slice", shuffle=True, duplicate_fraction=0.3, seed=1)
    paths = write_run(run, tmp_path / "out", options, truth=False)
    assert not (tmp_path / "out" / "truth.json").exists()
    out = storescu(live.port, paths)
    assert out.returncode == 0, out.stdout + out.stderr
    volumes = live.wait_volumes(N_VOLUMES)
    for t, volume in volumes.items():
        assert np.array_equal(volume.data, quantise(run.volume(t)))
    stats = live.scp_stats
    assert stats["accepted"] == N_VOLUMES * N_SLICES
    assert stats["duplicates"] == len(paths) - N_VOLUMES * N_SLICES > 0
