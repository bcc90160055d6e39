"""sinks/navigation.py: Brainsight and Localite target exports parse and carry the target.

The target is a real ``target`` message (topics.target_result through the
codec); the exports are read back with csv and xml.etree, in scanner RAS+ and
in DICOM LPS+.
"""

from __future__ import annotations

import csv
import io
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from boldstream.receiver.volume import SeriesInfo
from boldstream.sinks import topics
from boldstream.sinks.navigation import FRAMES, Target, brainsight_text, localite_xml
from boldstream.stream.codec import decode, encode
from boldstream.stream.messages import Message, Result

RAS = (-36.25, 30.5, 28.125)
SHAPE = (20, 24, 18)


def fake_series() -> SeriesInfo:
    return SeriesInfo(
        series_uid="1.2.826.0.1.3680043.10.543.12",
        study_uid="1.2.826.0.1.3680043.10.543",
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
    affine[:3, :3] = rz @ rx @ np.diag([3.0, 3.0, 3.5])
    affine[:3, 3] = [-50.0, -20.0, -10.0]
    return affine


def oblique_target(series: SeriesInfo, ras: tuple[float, float, float]) -> Result:
    return topics.target_result(
        series,
        40,
        {"status": "provisional", "ras_mm": list(ras), "mni_mm": [-38.0, 40.0, 30.0]},
        correlation_map=np.zeros(SHAPE, np.float32),
        vox2ras=oblique_vox2ras(),
    )


@pytest.fixture
def target() -> Target:
    message = decode(encode(Message(oblique_target(fake_series(), RAS))))
    assert isinstance(message.payload, Result)
    return Target.from_result(message.payload)


def parse_brainsight(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    """Header comments as key: value, and the targets table (as SimNIBS reads it)."""
    meta: dict[str, str] = {}
    lines = text.splitlines()
    for n, line in enumerate(lines):
        if line.startswith("# Target Name"):
            table = [line[2:], *lines[n + 1 :]]
            rows = list(csv.DictReader(io.StringIO("\n".join(table)), delimiter="\t"))
            return meta, rows
        key, _, value = line[2:].partition(": ")
        meta[key] = value
    raise AssertionError("no '# Target Name' line")


def test_target_from_a_message(target: Target) -> None:
    assert target.ras_mm == pytest.approx(RAS)
    assert target.lps_mm == pytest.approx((-RAS[0], -RAS[1], RAS[2]))
    assert target.vox2ras is not None and target.voxel_ijk is not None
    back = target.vox2ras @ np.array([*target.voxel_ijk, 1.0])
    np.testing.assert_allclose(back[:3], RAS, atol=1e-9)
    assert target.provisional and "provisional" in target.name


@pytest.mark.parametrize(("frame", "system"), [("RAS", "NIfTI:Scanner"), ("LPS", "World")])
def test_brainsight(target: Target, frame: str, system: str) -> None:
    text = brainsight_text([target], frame=frame)  # type: ignore[arg-type]
    meta, rows = parse_brainsight(text)
    assert meta["Coordinate system"] == system
    assert meta["Encoding"] == "UTF-8"
    assert meta["Units"].startswith("millimetres")
    assert len(rows) == 1
    row = rows[0]
    assert list(row)[:4] == ["Target Name", "Loc. X", "Loc. Y", "Loc. Z"]
    assert [k for k in row if k.startswith("m")] == [
        f"m{i}n{j}" for i in range(3) for j in range(3)
    ]
    expected = target.ras_mm if frame == "RAS" else target.lps_mm
    got = [float(row[c]) for c in ("Loc. X", "Loc. Y", "Loc. Z")]
    assert got == pytest.approx(expected, abs=5e-5)
    rotation = np.array([float(row[f"m{i}n{j}"]) for i in range(3) for j in range(3)])
    np.testing.assert_array_equal(rotation.reshape(3, 3), np.eye(3))
    assert row["Target Name"] == target.name
    assert "\t" not in row["Target Name"] and ";" not in row["Target Name"]


@pytest.mark.parametrize("frame", ["RAS", "LPS"])
def test_localite(target: Target, frame: str) -> None:
    text = localite_xml([target], frame=frame)  # type: ignore[arg-type]
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    root = ET.fromstring(text)
    assert root.tag == "InstrumentMarkerList"
    assert root.get("coordinateSpace") == frame
    markers = root.findall("InstrumentMarker")
    assert len(markers) == 1
    marker = markers[0].find("Marker")
    assert marker is not None and marker.get("description") == target.name
    matrix_el = marker.find("Matrix4D")
    assert matrix_el is not None
    matrix = np.array(
        [[float(matrix_el.get(f"data{r}{c}", "nan")) for c in range(4)] for r in range(4)]
    )
    expected = target.ras_mm if frame == "RAS" else target.lps_mm
    np.testing.assert_allclose(matrix[:3, 3], expected, atol=5e-7)
    np.testing.assert_array_equal(matrix[:3, :3], np.eye(3))
    np.testing.assert_array_equal(matrix[3], [0, 0, 0, 1])
    assert FRAMES[frame] in text  # the frame is named in the file


def test_an_unknown_frame_is_refused(target: Target) -> None:
    with pytest.raises(ValueError, match="unknown frame"):
        brainsight_text([target], frame="MNI")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown frame"):
        localite_xml([target], frame="ALS")  # type: ignore[arg-type]


def test_a_target_without_coordinates_is_refused() -> None:
    bad = topics.target_result(
        fake_series(),
        3,
        {"status": "provisional", "ras_mm": [1.0, float("inf"), 2.0]},
        correlation_map=np.zeros((2, 2, 2), np.float32),
        vox2ras=np.eye(4),
    )
    with pytest.raises(ValueError, match="ras_mm"):
        Target.from_result(bad)
