"""Decoding real and built DICOM instances into per-volume fragments."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest

from boldstream.config.settings import AssemblySettings
from boldstream.errors import DicomInputError
from boldstream.receiver.decode import (
    Fragment,
    decode_instance,
    dicom_time_to_seconds,
    session_key,
)

DEFAULT = AssemblySettings()
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _decode_one(ds: pydicom.Dataset, settings: AssemblySettings = DEFAULT) -> Fragment:
    fragments = decode_instance(ds, assembly=settings)
    assert len(fragments) == 1
    return fragments[0]


# -- Siemens mosaic ------------------------------------------------------------


def test_mosaic_tiles_timing_and_series_facts(mosaic_path: Path) -> None:
    ds = pydicom.dcmread(mosaic_path)
    fragment = _decode_one(ds)
    assert fragment.n_slices == 35 and fragment.matrix == (64, 64)
    assert fragment.expected_slices == 35
    mosaic = ds.pixel_array
    # Tile k sits at block (k // 6, k % 6) of the 6x6 mosaic, row-major.
    for k in (0, 5, 6, 34):
        r, c = divmod(k, 6)
        tile = mosaic[r * 64 : (r + 1) * 64, c * 64 : (c + 1) * 64]
        assert np.array_equal(fragment.pixels[k], tile)
    assert fragment.slice_times is not None
    assert fragment.slice_times[0] == 0.0
    assert math.isclose(fragment.slice_times[1], 0.0725, abs_tol=1e-9)  # 72.5 ms
    assert fragment.slice_times.max() < 3.0  # inside one TR
    info = fragment.series
    assert info.encoding == "mosaic" and info.tr_s == 3.0 and info.slices_per_volume == 35
    # Its protocol (series CSA header) says lRepetitions = 1: a run of two volumes.
    assert info.n_volumes == 2
    assert info.session_key == session_key(ds.SeriesInstanceUID)
    assert len(info.session_key) == 12 and int(info.session_key, 16) >= 0
    identifiers = [str(ds.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate")]
    published = [str(getattr(info, f.name)) for f in dataclasses.fields(info)]
    assert not any(i and i in v for i in identifiers for v in published)
    assert fragment.index == int(ds.InstanceNumber) - 1
    assert fragment.acquisition_time == pytest.approx(13 * 3600 + 49 * 60 + 38.315)
    # Tiles advance along the CSA slice normal by SpacingBetweenSlices.
    steps = np.diff(fragment.positions, axis=0)
    assert np.allclose(steps, fragment.normal * 3.6)


def test_consecutive_mosaics_get_consecutive_indices(b0dwi_paths: list[Path]) -> None:
    fragments = [_decode_one(pydicom.dcmread(p)) for p in b0dwi_paths]
    assert [f.index for f in fragments] == [0, 1, 2]
    assert len({f.series.series_uid for f in fragments}) == 1
    assert all(f.n_slices == 81 and f.matrix == (152, 150) for f in fragments)
    assert fragments[0].series.tr_s == pytest.approx(4.15)
    # A diffusion protocol has no lRepetitions: the run length is not stated.
    assert fragments[0].series.n_volumes is None


def test_nibabel_mosaics_of_one_series(nibabel_data: Path, builders: ModuleType) -> None:
    b0 = _decode_one(builders.read_sample(nibabel_data / "siemens_dwi_0.dcm.gz"))
    b1000 = _decode_one(builders.read_sample(nibabel_data / "siemens_dwi_1000.dcm.gz"))
    assert (b0.index, b1000.index) == (0, 1)
    assert b0.matrix == (128, 128) and b0.n_slices == 48


def test_nibabel_shrunk_mosaics_are_refused(nibabel_data: Path) -> None:
    # nibabel's 0.dcm/1.dcm claim 48 tiles but their pixel data was cut down
    # to 256x256, which no 7x7 grid of tiles fills: not a decodable volume.
    for name in ("0.dcm", "1.dcm"):
        with pytest.raises(DicomInputError, match="cannot hold 48 tiles"):
            decode_instance(pydicom.dcmread(nibabel_data / name), assembly=DEFAULT)


def test_mosaic_without_pixel_data_is_refused(nibabel_data: Path) -> None:
    ds = pydicom.dcmread(nibabel_data / "csa_slice_norm.dcm")
    with pytest.raises(DicomInputError, match="no pixel data"):
        decode_instance(ds, assembly=DEFAULT)


# -- Enhanced MR ---------------------------------------------------------------


def test_xa_localizer_is_refused_with_a_reason(xa_path: Path) -> None:
    with pytest.raises(DicomInputError, match="orientation varies"):
        decode_instance(pydicom.dcmread(xa_path), assembly=DEFAULT)


def test_xa_enhanced_stack_frames(xa_path: Path, builders: ModuleType) -> None:
    ds = builders.xa_as_stack(pydicom.dcmread(xa_path))
    fragment = _decode_one(ds)
    assert fragment.n_slices == 3 and fragment.matrix == (162, 162)
    frames = ds.pixel_array
    for k in range(3):
        assert np.array_equal(fragment.pixels[k], frames[k])
    assert fragment.series.encoding == "enhanced"
    assert fragment.series.tr_s == pytest.approx(0.00315)
    assert fragment.pixel_spacing == (1.6, 1.6)
    assert fragment.slice_times is None  # every frame has the same time
    assert fragment.acquisition_time == pytest.approx(14 * 3600 + 16 * 60 + 29.7325)


def test_philips_enhanced_volume_with_rescale(nibabel_data: Path, builders: ModuleType) -> None:
    fragment = _decode_one(builders.read_sample(nibabel_data / "philips_mprage.dcm.gz"))
    assert fragment.n_slices == 176 and fragment.matrix == (256, 256)
    assert np.allclose(fragment.slopes, 2.1079365079365)
    assert fragment.series.manufacturer.startswith("Philips")


def test_enhanced_with_several_temporal_positions(builders: ModuleType) -> None:
    rng = np.random.default_rng(3)
    n_slices, n_volumes = 4, 3
    positions = builders.stack_positions(AXIAL, (0, 0, 0), n_slices, 2.0)
    # Philips order: all slices of one dynamic, then the next; here shuffled.
    order = rng.permutation(n_slices * n_volumes)
    temporal = [1 + int(i) // n_slices for i in order]
    frames = rng.integers(0, 1000, size=(n_slices * n_volumes, 6, 5), dtype=np.uint16)
    slopes = [1.0 + 0.5 * (i % 3) for i in range(len(order))]
    ds = builders.build_enhanced(
        frames,
        positions[[int(i) % n_slices for i in order]],
        series_uid="1.2.3.99",
        iop=AXIAL,
        temporal_indices=temporal,
        slopes=slopes,
    )
    fragments = decode_instance(ds, assembly=DEFAULT)
    assert [f.index for f in fragments] == [0, 1, 2]
    for fragment in fragments:
        assert fragment.n_slices == 4 and fragment.expected_slices == 4
        members = [k for k, t in enumerate(temporal) if t == fragment.index + 1]
        for j, k in enumerate(members):
            assert np.array_equal(fragment.pixels[j], frames[k])
            assert fragment.slopes[j] == slopes[k]
        assert fragment.slice_times is not None
    assert fragments[0].series.tr_s == pytest.approx(0.8)


def test_enhanced_duplicate_positions_in_one_volume_are_refused(builders: ModuleType) -> None:
    positions = builders.stack_positions(AXIAL, (0, 0, 0), 2, 2.0)
    frames = np.zeros((4, 4, 4), dtype=np.uint16)
    ds = builders.build_enhanced(
        frames, positions[[0, 1, 0, 1]], series_uid="1.2.3.98", iop=AXIAL, temporal_indices=[1] * 4
    )
    with pytest.raises(DicomInputError, match="same position"):
        decode_instance(ds, assembly=DEFAULT)


# -- classic single-slice ------------------------------------------------------


def test_mr_small_needs_a_slice_count(pydicom_data: Path) -> None:
    ds = pydicom.dcmread(pydicom_data / "MR_small.dcm")
    with pytest.raises(DicomInputError, match="slices_per_volume"):
        decode_instance(ds, assembly=DEFAULT)
    fragment = _decode_one(ds, AssemblySettings(slices_per_volume=1))
    assert fragment.index == 0 and fragment.n_slices == 1 and fragment.matrix == (64, 64)
    assert np.array_equal(fragment.pixels[0], ds.pixel_array)
    assert fragment.series.encoding == "slice" and fragment.slice_spacing == pytest.approx(0.8)


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]
)
def test_transfer_syntaxes_give_the_same_pixels(pydicom_data: Path, name: str) -> None:
    settings = AssemblySettings(slices_per_volume=1)
    reference = _decode_one(pydicom.dcmread(pydicom_data / "MR_small.dcm"), settings)
    other = _decode_one(pydicom.dcmread(pydicom_data / name), settings)
    assert np.array_equal(other.pixels[0], reference.pixels[0])
    assert np.array_equal(other.positions, reference.positions)


@pytest.mark.parametrize("signed", [False, True])
def test_unused_high_bits_are_read_as_pydicom_reads_them(
    builders: ModuleType, signed: bool
) -> None:
    """12 of 16 bits stored: the high bits are cleared (or carry the sign), as
    pydicom's own decoder does, whatever the sender left in them."""
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 1 << 16, size=(6, 5), dtype=np.uint16)  # high bits: junk
    raw[0, :3] = [0x0FFF, 0xF800, 0x0800]  # 12-bit extremes, with and without junk
    ds = _one_slice(builders)
    ds.PixelData = raw.astype("<u2").tobytes()
    ds.Rows, ds.Columns = raw.shape
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelRepresentation = int(signed)
    fragment = _decode_one(ds, AssemblySettings(slices_per_volume=1))
    expected = ds.pixel_array
    assert expected.dtype == (np.int16 if signed else np.uint16)
    assert np.array_equal(fragment.pixels[0], expected)
    assert fragment.pixels[0].dtype == expected.dtype
    assert fragment.pixels[0][0, 0] == (-1 if signed else 0x0FFF)
    assert fragment.pixels[0][0, 2] == (-2048 if signed else 0x0800)


def _one_slice(builders: ModuleType, **kwargs: object) -> pydicom.Dataset:
    args: dict[str, object] = {
        "series_uid": "1.2.3.4",
        "iop": AXIAL,
        "ipp": (0, 0, 0),
        "instance_number": 14,
    }
    args.update(kwargs)
    ds: pydicom.Dataset = builders.build_slice(np.ones((4, 3), dtype=np.uint16), **args)
    return ds


def test_temporal_index_rules(builders: ModuleType) -> None:
    # Temporal position when there are several (Philips classic).
    ds = _one_slice(builders, temporal=(100, 6), acquisition_number=1, manufacturer="Philips")
    assert _decode_one(ds).index == 5
    # AcquisitionNumber for Siemens.
    ds = _one_slice(builders, acquisition_number=9, manufacturer="SIEMENS")
    assert _decode_one(ds).index == 8
    # InstanceNumber arithmetic with ImagesInAcquisition (GE): instance 14 of
    # 5-slice volumes is in volume 2.
    ds = _one_slice(builders, images_in_acquisition=5)
    fragment = _decode_one(ds)
    assert fragment.index == 2 and fragment.expected_slices == 5
    # The setting wins over the header.
    fragment = _decode_one(ds, AssemblySettings(slices_per_volume=7))
    assert fragment.index == 1 and fragment.expected_slices == 7
    ds = _one_slice(builders, acquisition_number=4, images_in_acquisition=5)
    assert _decode_one(ds, AssemblySettings(temporal_key="AcquisitionNumber")).index == 3


def test_philips_images_in_acquisition_counts_all_dynamics(builders: ModuleType) -> None:
    ds = _one_slice(builders, temporal=(10, 1), images_in_acquisition=300, manufacturer="Philips")
    assert _decode_one(ds).expected_slices == 30


def test_the_stated_number_of_volumes_is_kept(builders: ModuleType) -> None:
    ds = _one_slice(builders, temporal=(100, 6), acquisition_number=1, manufacturer="Philips")
    assert _decode_one(ds).series.n_volumes == 100
    # One temporal position says nothing about an fMRI run; none is unknown.
    ds = _one_slice(builders, temporal=(1, 1), images_in_acquisition=5)
    assert _decode_one(ds).series.n_volumes is None
    assert _decode_one(_one_slice(builders, images_in_acquisition=5)).series.n_volumes is None


def test_rescale_and_tr_of_a_slice(builders: ModuleType) -> None:
    ds = _one_slice(builders, images_in_acquisition=5, rescale=(2.5, -10.0), tr_ms=800.0)
    fragment = _decode_one(ds)
    assert (fragment.slopes[0], fragment.intercepts[0]) == (2.5, -10.0)
    assert fragment.series.tr_s == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: delattr(ds, "PixelData"), "no pixel data"),
        (lambda ds: delattr(ds, "ImageOrientationPatient"), "ImageOrientationPatient"),
        (lambda ds: delattr(ds, "ImagePositionPatient"), "ImagePositionPatient"),
        (lambda ds: delattr(ds, "PixelSpacing"), "PixelSpacing"),
        (lambda ds: setattr(ds, "PixelData", ds.PixelData[:10]), "truncated"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), "unsupported image type"),
        (lambda ds: setattr(ds, "SamplesPerPixel", 3), "unsupported image type"),
        (lambda ds: delattr(ds, "SeriesInstanceUID"), "SeriesInstanceUID"),
        (lambda ds: setattr(ds, "InstanceNumber", 0), "not a positive count"),
    ],
)
def test_bad_input_is_a_readable_dicom_input_error(
    builders: ModuleType, change: object, message: str
) -> None:
    ds = _one_slice(builders, images_in_acquisition=5)
    change(ds)  # type: ignore[operator]
    with pytest.raises(DicomInputError, match=message):
        decode_instance(ds, assembly=DEFAULT)


def test_dicom_times() -> None:
    assert dicom_time_to_seconds("134938.315000") == pytest.approx(49778.315)
    assert dicom_time_to_seconds("13:49:38") == pytest.approx(49778.0)
    assert dicom_time_to_seconds("20221116141629.732500") == pytest.approx(51389.7325)
    assert dicom_time_to_seconds("1349") == pytest.approx(49740.0)
    assert dicom_time_to_seconds("") is None and dicom_time_to_seconds(None) is None
