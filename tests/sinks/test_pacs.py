"""sinks/pacs.py: the map and the target marker sent by C-STORE to DCMTK's storescp.

storescp (the native DCMTK binary) is started by the test on 127.0.0.1 on a
port taken from the kernel; the files it stores are read back with pydicom
and their geometry is rebuilt with the receiver's own slice_affine, so the
round trip RAS -> LPS (this edge) -> RAS (the receiver) is checked end to end.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from peers import free_port, storescp_peer
from pydicom.dataset import Dataset

from boldstream.errors import SinkError
from boldstream.receiver.geometry import lps_to_ras, ras_to_lps, slice_affine, slice_normal
from boldstream.receiver.volume import SeriesInfo
from boldstream.sinks import topics
from boldstream.sinks.navigation import Target
from boldstream.sinks.pacs import MAP_SCALE, PacsPeer, SourceStudy, send_target
from boldstream.stream.codec import decode, encode
from boldstream.stream.messages import Message, Result

SHAPE = (20, 24, 18)
STUDY_UID = "1.2.826.0.1.3680043.10.543.77"
FOR_UID = "1.2.826.0.1.3680043.10.543.77.9"


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[PacsPeer, Path]]:
    out = tmp_path / "received"
    out.mkdir()
    with storescp_peer(out) as port:
        yield PacsPeer("127.0.0.1", port, "TESTPACS", timeout_s=10.0), out


def series() -> SeriesInfo:
    return SeriesInfo(
        series_uid=f"{STUDY_UID}.12",
        study_uid=STUDY_UID,
        description="rest_bold",
        session_key="sess-7f3a",
        series_number=12,
        tr_s=0.8,
    )


def oblique_vox2ras() -> np.ndarray:
    a, b = np.radians(15.0), np.radians(-8.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([3.0, 2.5, 3.5])
    affine[:3, 3] = [-50.0, -20.0, -10.0]
    return affine


def correlation_map() -> np.ndarray:
    rng = np.random.default_rng(5)
    corr = rng.uniform(-0.8, 0.8, SHAPE).astype(np.float32)
    corr[:2] = np.nan  # outside the brain
    return corr


def target_message() -> Result:
    ras = (oblique_vox2ras() @ np.array([6.3, 15.8, 9.4, 1.0]))[:3]
    result = topics.target_result(
        series(),
        300,
        {"status": "settling", "ras_mm": ras.tolist(), "mni_mm": [-38.0, 40.0, 30.0]},
        correlation_map=correlation_map(),
        vox2ras=oblique_vox2ras(),
    )
    payload = decode(encode(Message(result))).payload
    assert isinstance(payload, Result)
    return payload


def source_instance() -> Dataset:
    ds = Dataset()
    ds.PatientName = "Test^Pseudonym"
    ds.PatientID = "PSEUDO-001"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = f"{STUDY_UID}.12"
    ds.StudyDate = "20250102"
    ds.StudyTime = "101500"
    ds.StudyID = "42"
    ds.AccessionNumber = "ACC42"
    ds.FrameOfReferenceUID = FOR_UID
    return ds


def received(folder: Path) -> dict[str, list[Any]]:
    by_series: dict[str, list[Any]] = {}
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        by_series.setdefault(ds.SeriesDescription, []).append(ds)
    return by_series


def rebuild(slices: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(volume in r units, vox2ras) as the receiver would assemble the stored slices."""
    iop = [float(v) for v in slices[0].ImageOrientationPatient]
    normal = slice_normal(iop)
    slices = sorted(slices, key=lambda d: float(np.dot(d.ImagePositionPatient, normal)))
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in slices])
    vox2ras = slice_affine(iop, [float(v) for v in slices[0].PixelSpacing], positions)
    volume = np.stack(
        [
            d.pixel_array.T.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept)
            for d in slices
        ],
        axis=-1,
    )
    return volume, vox2ras


def test_map_and_marker_round_trip(storescp: tuple[PacsPeer, Path]) -> None:
    peer, folder = storescp
    result = target_message()
    sent = send_target(result, peer, source=SourceStudy.from_dataset(source_instance()))
    assert sent.instances == 2 * SHAPE[2]
    got = received(folder)
    assert set(got) == {
        "boldstream sgACC connectivity (settling)",
        "boldstream TMS target marker (settling)",
    }
    for group in got.values():
        assert len(group) == SHAPE[2]
        first = group[0]
        assert first.StudyInstanceUID == STUDY_UID
        assert first.FrameOfReferenceUID == FOR_UID
        assert first.PatientID == "PSEUDO-001" and str(first.PatientName) == "Test^Pseudonym"
        assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert first.Modality == "MR"
        assert first.SOPClassUID == pydicom.uid.MRImageStorage
        assert len({d.SeriesInstanceUID for d in group}) == 1
        assert len({d.SOPInstanceUID for d in group}) == SHAPE[2]
    assert (
        got["boldstream sgACC connectivity (settling)"][0].SeriesInstanceUID == sent.series["map"]
    )

    volume, vox2ras = rebuild(got["boldstream sgACC connectivity (settling)"])
    np.testing.assert_allclose(vox2ras, oblique_vox2ras(), atol=1e-4)
    expected = np.nan_to_num(correlation_map(), nan=0.0)
    assert volume.shape == SHAPE
    np.testing.assert_allclose(volume, expected, atol=0.5 / MAP_SCALE + 1e-9)

    target = Target.from_result(result)
    marker_slices = got["boldstream TMS target marker (settling)"]
    marker, marker_vox2ras = rebuild(marker_slices)
    np.testing.assert_allclose(marker_vox2ras, oblique_vox2ras(), atol=1e-4)
    peak = np.unravel_index(int(np.argmax(marker)), marker.shape)
    assert marker[peak] == pytest.approx(1.0)
    assert tuple(int(v) for v in peak) == (6, 16, 9)  # nearest voxel to (6.3, 15.8, 9.4)
    # The marked voxel's LPS position read straight from its slice's DICOM geometry.
    normal = slice_normal([float(v) for v in marker_slices[0].ImageOrientationPatient])
    ordered = sorted(marker_slices, key=lambda d: float(np.dot(d.ImagePositionPatient, normal)))
    ds = ordered[peak[2]]
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    i, j = int(peak[0]), int(peak[1])  # column index, row index
    marked_lps = (
        np.array([float(v) for v in ds.ImagePositionPatient])
        + i * col_spacing * iop[:3]
        + j * row_spacing * iop[3:]
    )
    expected_lps = (ras_to_lps(oblique_vox2ras()) @ np.array([*peak, 1.0]))[:3]
    np.testing.assert_allclose(marked_lps, expected_lps, atol=1e-3)
    half_diagonal = 0.5 * float(np.linalg.norm([3.0, 2.5, 3.5]))
    assert np.linalg.norm(marked_lps - np.array(target.lps_mm)) <= half_diagonal
    back_ras = (lps_to_ras(np.eye(4)) @ np.array([*marked_lps, 1.0]))[:3]
    ijk = np.linalg.solve(oblique_vox2ras(), np.array([*back_ras, 1.0]))[:3]
    np.testing.assert_allclose(ijk, peak, atol=1e-3)


def test_without_a_source_the_study_comes_from_the_series(
    storescp: tuple[PacsPeer, Path],
) -> None:
    peer, folder = storescp
    send_target(target_message(), peer, marker=False, series_number=4321)
    got = received(folder)
    assert list(got) == ["boldstream sgACC connectivity (settling)"]
    first = got["boldstream sgACC connectivity (settling)"][0]
    assert first.StudyInstanceUID == STUDY_UID
    assert first.SeriesNumber == 4321
    assert first.PatientID == ""  # boldstream never had the patient's identifiers


def test_an_unreachable_pacs_is_one_readable_error() -> None:
    peer = PacsPeer("127.0.0.1", free_port(), "NOBODY", timeout_s=5.0)
    started = time.monotonic()
    with pytest.raises(SinkError, match=re.escape(f"NOBODY@127.0.0.1:{peer.port}")):
        send_target(target_message(), peer)
    assert time.monotonic() - started < 10.0
