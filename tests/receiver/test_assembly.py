"""Assembling fragments into volumes: completion, ordering, duplicates, timeouts."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest

from boldstream.config.settings import AssemblySettings
from boldstream.errors import DicomInputError
from boldstream.receiver.assembly import Assembler
from boldstream.receiver.decode import Fragment, decode_instance
from boldstream.receiver.geometry import slice_affine
from boldstream.receiver.volume import Volume, VolumeIncomplete
from boldstream.simulator.encode import SeriesSpec, encode_volume
from boldstream.simulator.phantom import make_phantom_run

SETTINGS = AssemblySettings(volume_timeout_s=10.0, slice_grace_s=1.0, series_idle_timeout_s=300.0)
T0 = 1_700_000_000.0
OBLIQUE = (0.9848077530, 0.0, -0.1736481777, 0.0302536, 0.9848077530, 0.1715878)


def _decode(ds: pydicom.Dataset, settings: AssemblySettings = SETTINGS) -> list[Fragment]:
    return decode_instance(ds, assembly=settings)


def _only_volume(events: list[Volume | VolumeIncomplete]) -> Volume:
    assert len(events) == 1 and isinstance(events[0], Volume)
    return events[0]


def _expected_volume(stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0) -> np.ndarray:
    """Stored (slice, row, col) slices -> the (col, row, slice) float32 volume."""
    return (stored.transpose(2, 1, 0) * slope + intercept).astype(np.float32)


# -- real mosaics ----------------------------------------------------------------


def test_mosaic_becomes_one_volume_voxel_for_voxel(mosaic_path: Path) -> None:
    ds = pydicom.dcmread(mosaic_path)
    assembler = Assembler(SETTINGS)
    before = time.time()
    volume = _only_volume(assembler.add(_decode(ds), received=T0))
    assert before <= volume.assembled <= time.time()
    assert volume.data.dtype == np.float32 and volume.shape == (64, 64, 35)
    assert volume.data.flags.c_contiguous
    mosaic = ds.pixel_array
    for k in (0, 17, 34):
        r, c = divmod(k, 6)
        tile = mosaic[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64]
        assert np.array_equal(volume.data[:, :, k], tile.T.astype(np.float32))
    assert (volume.first_received, volume.last_received) == (T0, T0)
    assert volume.instance_uids == (ds.SOPInstanceUID,)
    assert volume.index == 1 and volume.acquisition_time == pytest.approx(49778.315)
    assert volume.series.slice_timing is not None and len(volume.series.slice_timing) == 35
    assert np.allclose(volume.voxel_size, [3.25, 3.25, 3.6], atol=1e-6)
    assert assembler.pending_volumes == 0


@pytest.mark.parametrize("orientation", ["axial", "oblique"])
def test_a_prepared_mosaic_gives_the_same_volume(orientation: str) -> None:
    """What prepare() fills ahead of the durable write is the volume add() would fill."""
    run = make_phantom_run(n_volumes=2, shape=(20, 16, 7), orientation=orientation)
    spec = SeriesSpec(tr_s=2.0, n_volumes=2)
    for t in range(2):
        (ds,) = encode_volume(run.volume(t), run.vox2ras, spec, t, encoding="mosaic")
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, -3  # the cast path with a rescale
        fragments = _decode(ds)
        plain = _only_volume(Assembler(SETTINGS).add(fragments, received=T0))
        assembler = Assembler(SETTINGS)
        prepared = assembler.prepare(fragments)
        assert len(prepared) == 1
        ahead = _only_volume(assembler.add(fragments, received=T0, prepared=prepared))
        assert ahead.data is prepared[0].data  # used, not filled again
        np.testing.assert_array_equal(ahead.data, plain.data)
        np.testing.assert_array_equal(ahead.vox2ras, plain.vox2ras)
        assert ahead.series == plain.series and ahead.index == plain.index == t


def test_a_prepared_array_is_used_only_for_its_own_fragment(builders: ModuleType) -> None:
    volumes, _ = builders.build_series(1, 3, images_in_acquisition=3)
    slices = [_decode(ds)[0] for ds in volumes[0]]
    assembler = Assembler(SETTINGS)
    assert assembler.prepare(slices[:1]) == []  # one slice of three: nothing to prepare
    run = make_phantom_run(n_volumes=1, shape=(20, 16, 7))
    (ds,) = encode_volume(run.volume(0), run.vox2ras, SeriesSpec(tr_s=2.0, n_volumes=1), 0,
                          encoding="mosaic")  # fmt: skip
    fragment = _decode(ds)[0]
    prepared = assembler.prepare([fragment])
    twin = dataclasses.replace(fragment)  # the same content, another fragment
    volume = _only_volume(assembler.add([twin], received=T0, prepared=prepared))
    assert volume.data is not prepared[0].data
    np.testing.assert_array_equal(volume.data, prepared[0].data)


def test_three_mosaics_are_three_consecutive_volumes(b0dwi_paths: list[Path]) -> None:
    assembler = Assembler(SETTINGS)
    volumes = []
    for i, path in enumerate(b0dwi_paths):
        volumes.append(_only_volume(assembler.add(_decode(pydicom.dcmread(path)), received=T0 + i)))
    assert [v.index for v in volumes] == [0, 1, 2]
    assert all(v.shape == (150, 152, 81) for v in volumes)
    assert volumes[0].series is volumes[2].series
    assert assembler.stats.volumes == 3


def test_resent_mosaic_is_ignored_as_late(mosaic_path: Path) -> None:
    ds = pydicom.dcmread(mosaic_path)
    assembler = Assembler(SETTINGS)
    assembler.add(_decode(ds), received=T0)
    assert assembler.add(_decode(ds), received=T0 + 1) == []
    assert assembler.stats.late_slices == 35 and assembler.pending_volumes == 0


# -- enhanced --------------------------------------------------------------------


def test_xa_enhanced_stack_volume(xa_path: Path, builders: ModuleType) -> None:
    ds = builders.xa_as_stack(pydicom.dcmread(xa_path))
    volume = _only_volume(Assembler(SETTINGS).add(_decode(ds), received=T0))
    assert volume.shape == (162, 162, 3)
    frames = ds.pixel_array
    # Sorted by position along the normal: compare each frame where it landed.
    landed = [
        int(np.argmin([np.abs(volume.data[:, :, z] - f.T).sum() for z in range(3)])) for f in frames
    ]
    assert sorted(landed) == [0, 1, 2]
    for frame, z in zip(frames, landed, strict=True):
        assert np.array_equal(volume.data[:, :, z], frame.T.astype(np.float32))


def test_philips_style_series_in_one_instance(builders: ModuleType) -> None:
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    positions = builders.stack_positions(axial, (0, 0, 0), 3, 2.0)
    frames = np.arange(9 * 4 * 5, dtype=np.uint16).reshape(9, 4, 5)
    ds = builders.build_enhanced(
        frames,
        positions[[2, 0, 1] * 3],
        series_uid="1.2.3.55",
        iop=axial,
        temporal_indices=[1, 1, 1, 2, 2, 2, 3, 3, 3],
        slopes=[2.0] * 9,
    )
    events = Assembler(SETTINGS).add(_decode(ds), received=T0)
    assert [e.index for e in events] == [0, 1, 2]
    for t, volume in enumerate(events):
        assert isinstance(volume, Volume)
        stored = frames[3 * t : 3 * t + 3][[1, 2, 0]]  # back in position order
        assert np.array_equal(volume.data, _expected_volume(stored, slope=2.0))


# -- per-slice series ------------------------------------------------------------


def _slice_fragments(volumes: list[list[pydicom.Dataset]]) -> list[list[Fragment]]:
    return [[f for ds in vol for f in _decode(ds)] for vol in volumes]


def test_shuffled_slices_with_duplicates_give_the_ordered_volume(builders: ModuleType) -> None:
    volumes, stored = builders.build_series(
        2, 9, iop=OBLIQUE, images_in_acquisition=9, rescale=(0.5, 3.0)
    )
    fragments = _slice_fragments(volumes)
    in_order = Assembler(SETTINGS)
    reference = [in_order.add([f], received=T0) for f in fragments[0]][-1]
    expected = _only_volume(reference)
    assert np.array_equal(expected.data, _expected_volume(stored[0], 0.5, 3.0))

    rng = np.random.default_rng(5)
    arrivals = fragments[0] + fragments[0][:4] + fragments[1]  # resends
    shuffled = [arrivals[i] for i in rng.permutation(len(arrivals))]
    assembler = Assembler(SETTINGS)
    events = []
    for n, fragment in enumerate(shuffled):
        events += assembler.add([fragment], received=T0 + n * 0.01)
    by_index = {e.index: e for e in events}
    assert sorted(by_index) == [0, 1]
    first = by_index[0]
    assert isinstance(first, Volume)
    assert np.array_equal(first.data, expected.data)
    assert np.allclose(first.vox2ras, expected.vox2ras)
    assert set(first.instance_uids) == {ds.SOPInstanceUID for ds in volumes[0]}
    assert assembler.stats.duplicate_slices + assembler.stats.late_slices == 4
    assert assembler.pending_volumes == 0


def _stamp(volumes: list[list[pydicom.Dataset]], offsets: list[float], tr_s: float) -> None:
    """AcquisitionTime of slice z of volume t: 12:00:00 + t * TR + offsets[z]."""
    for t, slices in enumerate(volumes):
        for z, ds in enumerate(slices):
            seconds = t * tr_s + offsets[z]
            ds.AcquisitionTime = f"1200{int(seconds // 1):02d}.{round(seconds % 1 * 1e6):06d}"


def test_per_slice_timing_comes_from_the_slices_acquisition_times(builders: ModuleType) -> None:
    volumes, _ = builders.build_series(2, 6, images_in_acquisition=6, tr_ms=2000.0)
    # interleaved: positions 0, 2, 4 first, then 1, 3, 5; a third of a TR apart
    offsets = [0.0, 1.0, 1 / 3, 4 / 3, 2 / 3, 5 / 3]
    _stamp(volumes, offsets, 2.0)
    fragments = _slice_fragments(volumes)
    rng = np.random.default_rng(2)
    arrivals = [fragments[0][i] for i in rng.permutation(6)]
    assembler = Assembler(SETTINGS)
    volume = _only_volume([e for f in arrivals for e in assembler.add([f], received=T0)])
    assert volume.series.slice_timing == pytest.approx(offsets, abs=1e-6)
    assert volume.acquisition_time == pytest.approx(12 * 3600.0)


@pytest.mark.parametrize(
    ("offsets", "why"),
    [
        ([0.0] * 6, "one time stamped on every slice"),
        ([0.0, 0.5, 1.0, 1.5, 2.0, 2.5], "slices spread over more than one TR"),
    ],
)
def test_per_slice_timing_is_unknown_when_the_times_cannot_be_it(
    builders: ModuleType, offsets: list[float], why: str
) -> None:
    volumes, _ = builders.build_series(1, 6, images_in_acquisition=6, tr_ms=2000.0)
    _stamp(volumes, offsets, 2.0)
    assembler = Assembler(SETTINGS)
    events = [e for f in _slice_fragments(volumes)[0] for e in assembler.add([f], received=T0)]
    assert _only_volume(events).series.slice_timing is None, why


def test_vox2ras_of_assembled_slices(builders: ModuleType) -> None:
    volumes, _ = builders.build_series(1, 5, iop=OBLIQUE, spacing=4.0, images_in_acquisition=5)
    assembler = Assembler(SETTINGS)
    events = [e for f in _slice_fragments(volumes)[0] for e in assembler.add([f], received=T0)]
    volume = _only_volume(events)
    positions = builders.stack_positions(OBLIQUE, (-90.0, -100.0, -40.0), 5, 4.0)
    assert np.allclose(volume.vox2ras, slice_affine(OBLIQUE, (3.0, 3.0), positions))
    corner = volume.vox2ras @ np.array([0, 0, 4, 1.0])
    assert np.allclose(corner[:3], positions[4] * [-1, -1, 1])


def test_missing_slice_times_out_without_blocking_the_next_volume(builders: ModuleType) -> None:
    volumes, stored = builders.build_series(2, 6, images_in_acquisition=6)
    fragments = _slice_fragments(volumes)
    assembler = Assembler(SETTINGS)
    events = []
    for n, fragment in enumerate(fragments[0][:3] + fragments[0][4:]):  # slice 3 lost
        events += assembler.add([fragment], received=T0 + 0.1 * n)
    for n, fragment in enumerate(fragments[1]):
        events += assembler.add([fragment], received=T0 + 2 + 0.1 * n)
    second = _only_volume(events)
    assert second.index == 1
    assert np.array_equal(second.data, _expected_volume(stored[1]))
    assert assembler.expire(T0 + 9.9) == []
    expired = assembler.expire(T0 + 10.0)
    assert len(expired) == 1 and isinstance(expired[0], VolumeIncomplete)
    incomplete = expired[0]
    assert (incomplete.index, incomplete.slices_received, incomplete.slices_expected) == (0, 5, 6)
    assert incomplete.first_received == T0 and incomplete.reported == T0 + 10.0
    assert assembler.pending_volumes == 0 and assembler.stats.incomplete == 1
    # The lost slice turns up after all: reported, not resurrected.
    assert assembler.add([fragments[0][3]], received=T0 + 11) == []
    assert assembler.stats.late_slices == 1 and assembler.pending_volumes == 0


def test_unknown_slice_count_is_learnt_after_the_grace(builders: ModuleType) -> None:
    # Siemens per-slice without ImagesInAcquisition: AcquisitionNumber says
    # which volume, nothing says how many slices.
    volumes, stored = builders.build_series(3, 4, manufacturer="SIEMENS")
    for t, vol in enumerate(volumes):
        for ds in vol:
            ds.AcquisitionNumber = t + 1
    fragments = _slice_fragments(volumes)
    assert fragments[0][0].expected_slices is None
    assembler = Assembler(SETTINGS)
    events = []
    for n, fragment in enumerate(fragments[0]):
        events += assembler.add([fragment], received=T0 + 0.1 * n)
    assert events == [] and assembler.expire(T0 + 5.0) == []  # no later volume yet
    events += assembler.add([fragments[1][0]], received=T0 + 2.0)
    assert assembler.expire(T0 + 1.2) == []  # 0.9 s quiet: within the grace
    closed = assembler.expire(T0 + 2.5)
    first = _only_volume(closed)
    assert first.index == 0 and np.array_equal(first.data, _expected_volume(stored[0]))
    assert first.series.slices_per_volume == 4
    # From now on the count is known: volumes complete on their last slice.
    for fragment in fragments[1][1:]:
        events += assembler.add([fragment], received=T0 + 2.1)
    second = _only_volume(events)
    assert second.index == 1 and second.series.slices_per_volume == 4
    third = [e for f in fragments[2] for e in assembler.add([f], received=T0 + 4)]
    assert _only_volume(third).index == 2


def test_lone_volume_with_unknown_count_is_delivered_at_the_timeout(
    pydicom_data: Path,
) -> None:
    ds = pydicom.dcmread(pydicom_data / "MR_small.dcm")
    ds.NumberOfTemporalPositions, ds.TemporalPositionIdentifier = 2, 1
    assembler = Assembler(SETTINGS)
    assert assembler.add(_decode(ds), received=T0) == []
    volume = _only_volume(assembler.expire(T0 + SETTINGS.volume_timeout_s))
    assert volume.shape == (64, 64, 1)
    assert np.array_equal(volume.data[:, :, 0], ds.pixel_array.T.astype(np.float32))
    assert np.isclose(volume.voxel_size[2], 0.8)


def test_mr_small_as_a_one_slice_volume(pydicom_data: Path) -> None:
    ds = pydicom.dcmread(pydicom_data / "MR_small.dcm")
    settings = AssemblySettings(slices_per_volume=1)
    volume = _only_volume(Assembler(settings).add(_decode(ds, settings), received=T0))
    assert volume.index == 0 and volume.shape == (64, 64, 1)
    assert np.array_equal(volume.data[:, :, 0], ds.pixel_array.T.astype(np.float32))


def test_matrix_change_mid_series_refuses_the_instance(builders: ModuleType) -> None:
    volumes, _ = builders.build_series(1, 3, images_in_acquisition=3, series_uid="1.2.3.7")
    bigger, _ = builders.build_series(1, 3, rows=20, images_in_acquisition=3, series_uid="1.2.3.7")
    assembler = Assembler(SETTINGS)
    assembler.add(_decode(volumes[0][0]), received=T0)
    with pytest.raises(DicomInputError, match="matrix changed from 12x10 to 20x10"):
        assembler.add(_decode(bigger[0][1]), received=T0)
    assert assembler.stats.rejected == 1
    assert _only_volume(
        [e for ds in volumes[0][1:] for e in assembler.add(_decode(ds), received=T0)]
    ).shape == (10, 12, 3)


def test_orientation_change_inside_a_volume_refuses_the_slice(builders: ModuleType) -> None:
    volumes, _ = builders.build_series(1, 3, images_in_acquisition=3, series_uid="1.2.3.8")
    tilted, _ = builders.build_series(
        1, 3, iop=OBLIQUE, images_in_acquisition=3, series_uid="1.2.3.8"
    )
    assembler = Assembler(SETTINGS)
    assembler.add(_decode(volumes[0][0]), received=T0)
    with pytest.raises(DicomInputError, match="orientation differs"):
        assembler.add(_decode(tilted[0][1]), received=T0)


def test_uneven_stack_is_reported_not_raised(builders: ModuleType) -> None:
    volumes, _ = builders.build_series(1, 4, images_in_acquisition=4)
    volumes[0][3].ImagePositionPatient = [-90.0, -100.0, -40.0 + 3.5 * 5]  # skips a slot
    assembler = Assembler(SETTINGS)
    events = [e for ds in volumes[0] for e in assembler.add(_decode(ds), received=T0)]
    assert len(events) == 1 and isinstance(events[0], VolumeIncomplete)
    assert events[0].slices_received == 4 and assembler.stats.rejected == 1


def test_idle_series_is_forgotten(builders: ModuleType) -> None:
    volumes, _ = builders.build_series(1, 3, images_in_acquisition=3)
    settings = AssemblySettings(volume_timeout_s=100.0, series_idle_timeout_s=30.0)
    assembler = Assembler(settings)
    assembler.add(_decode(volumes[0][0], settings), received=T0)
    events = assembler.expire(T0 + 30.0)
    assert len(events) == 1 and isinstance(events[0], VolumeIncomplete)
    assert assembler.pending_volumes == 0 and assembler._series == {}


def test_a_long_run_of_mosaics_leaves_nothing_pending(mosaic_path: Path) -> None:
    """200 mosaics, each its own volume at once. (Its speed, the 5 ms p95
    target, is measured in benchmarks/receive.py, not here.)"""
    fragment = _decode(pydicom.dcmread(mosaic_path))[0]
    assembler = Assembler(SETTINGS)
    indices = []
    for i in range(200):
        moved = [dataclasses.replace(fragment, index=fragment.index + i + 1)]
        indices += [e.index for e in assembler.add(moved, received=T0) if isinstance(e, Volume)]
    assert indices == [fragment.index + i + 1 for i in range(200)]
    assert assembler.pending_volumes == 0


def test_count_is_not_learnt_from_a_volume_with_a_hole(builders: ModuleType) -> None:
    volumes, stored = builders.build_series(3, 5, manufacturer="SIEMENS")
    for t, vol in enumerate(volumes):
        for ds in vol:
            ds.AcquisitionNumber = t + 1
    fragments = _slice_fragments(volumes)
    assembler = Assembler(SETTINGS)
    for fragment in fragments[0][:2] + fragments[0][3:]:  # middle slice lost
        assembler.add([fragment], received=T0)
    assembler.add(fragments[1], received=T0 + 2.0)
    rejected = assembler.expire(T0 + 3.5)
    assert len(rejected) == 1 and isinstance(rejected[0], VolumeIncomplete)
    assembler.add(fragments[2][:1], received=T0 + 4.0)
    second = _only_volume(assembler.expire(T0 + 5.5))
    assert second.index == 1 and second.series.slices_per_volume == 5
    assert np.array_equal(second.data, _expected_volume(stored[1]))
