"""The lean reader against pydicom: the same values, the same fragments, or None.

Every sample is written as a Part 10 file (what the spool holds and the
ingest process is sent) in implicit and explicit VR little endian; wherever
:func:`read_lean` reads it, each element of :data:`KEYWORDS`, the selector's
decision and the decoded fragments (or the DicomInputError) must be those of
the pydicom path.
"""

from __future__ import annotations

import copy
import io
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from boldstream.config.settings import AssemblySettings, SelectorSettings
from boldstream.errors import DicomInputError
from boldstream.receiver.decode import decode_instance
from boldstream.receiver.ingest import Ingest
from boldstream.receiver.lean import KEYWORDS, LeanDataset, read_lean
from boldstream.receiver.scp import Received
from boldstream.receiver.selector import SeriesSelector
from boldstream.simulator.encode import SeriesSpec, encode_volume
from boldstream.simulator.phantom import make_phantom_run

ROOT = Path(__file__).resolve().parents[2]
SYNTAXES = {"implicit": ImplicitVRLittleEndian, "explicit": ExplicitVRLittleEndian}
ASSEMBLY = AssemblySettings()
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def part10(ds: Dataset, syntax: str) -> bytes:
    out = ds.copy()
    out.file_meta = ds.file_meta.copy() if hasattr(ds, "file_meta") else pydicom.FileMetaDataset()
    out.file_meta.TransferSyntaxUID = syntax
    out.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", MR_IMAGE_STORAGE)
    out.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3.4")
    buffer = io.BytesIO()
    out.save_as(buffer, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True,
                enforce_file_format=True)  # fmt: skip
    return buffer.getvalue()


def _simulated() -> Iterator[tuple[str, Dataset]]:
    for orientation in ("axial", "oblique"):
        run = make_phantom_run(n_volumes=1, shape=(24, 20, 9), orientation=orientation)
        spec = SeriesSpec(tr_s=2.0, n_volumes=10)
        for encoding in ("mosaic", "slice"):
            for k, ds in enumerate(encode_volume(run.volume(0), run.vox2ras, spec, 0,
                                                 encoding=encoding)):  # fmt: skip
                if k < 2:
                    yield f"simulator {encoding} {orientation} {k}", ds


@pytest.fixture(scope="module")
def samples(
    heudiconv_data: Path, nibabel_data: Path, pydicom_data: Path
) -> list[tuple[str, Dataset]]:
    out = list(_simulated())
    for path in [
        heudiconv_data / "axasc35.dcm",
        *sorted((heudiconv_data / "b0dwiForFmap").glob("*.dcm")),
    ]:
        out.append((f"heudiconv {path.name}", pydicom.dcmread(path)))
    for name in ("0.dcm", "1.dcm", "csa_slice_norm.dcm", "decimal_rescale.dcm",
                 "slicethickness_empty_string.dcm"):  # fmt: skip
        out.append((f"nibabel {name}", pydicom.dcmread(nibabel_data / name)))
    for name in ("MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm"):
        out.append((f"pydicom {name}", pydicom.dcmread(pydicom_data / name)))
    return out


def _plain(value: Any) -> Any:
    """pydicom's value types (MultiValue, DSfloat, IS, UID) as plain Python."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, list | pydicom.multival.MultiValue):
        return [_plain(v) for v in value]
    return value


def _outcome(ds: Any) -> Any:
    try:
        return decode_instance(ds, assembly=ASSEMBLY)
    except DicomInputError as exc:
        return str(exc)


def _same_fragments(lean: Any, ref: Any) -> None:
    if isinstance(ref, str):
        assert lean == ref
        return
    assert len(lean) == len(ref)
    for a, b in zip(lean, ref, strict=True):
        for field in a.__dataclass_fields__:
            x, y = getattr(a, field), getattr(b, field)
            if field == "pixels":
                assert len(x) == len(y)
                for p, q in zip(x, y, strict=True):
                    assert p.dtype == q.dtype
                    np.testing.assert_array_equal(p, q)
            elif isinstance(y, np.ndarray):
                np.testing.assert_array_equal(x, y)
            else:
                assert x == y, field


@pytest.mark.filterwarnings("ignore:The value length:UserWarning")  # a long SH in a sample
@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_lean_reads_what_pydicom_reads(samples: list[tuple[str, Dataset]], syntax: str) -> None:
    selector = SeriesSelector(SelectorSettings(exclude_image_types=()))
    read = []
    for name, ds in samples:
        data = part10(ds, SYNTAXES[syntax])
        lean = read_lean(data)
        ref = pydicom.dcmread(io.BytesIO(data))
        if lean is None:
            continue
        read.append(name)
        for keyword in KEYWORDS:
            assert (keyword in lean) == (keyword in ref), (name, keyword)
            assert _plain(lean.get(keyword)) == _plain(ref.get(keyword)), (name, keyword)
        sop = str(ref.get("SOPClassUID", ""))
        assert selector.decide(lean, sop) == selector.decide(ref, sop), name
        _same_fragments(_outcome(lean), _outcome(ref))
    # The simulator's and the builders' files, the heudiconv mosaics and
    # nibabel's are all read lean; only files pydicom must decode are not.
    assert [n for n, _ in samples if n not in read] == [], read


def test_built_slices_and_their_errors(builders: ModuleType) -> None:
    volumes, _ = builders.build_series(1, 3, images_in_acquisition=3)
    bare = copy.deepcopy(volumes[0][1])
    del bare.ImagePositionPatient
    nan = copy.deepcopy(volumes[0][2])
    nan.PixelSpacing = ["0", "1"]
    for ds in [*volumes[0], bare, nan]:
        for syntax in SYNTAXES.values():
            data = part10(ds, syntax)
            lean = read_lean(data)
            assert lean is not None
            _same_fragments(_outcome(lean), _outcome(pydicom.dcmread(io.BytesIO(data))))


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # damaged on purpose
def test_what_it_does_not_read_exactly_goes_to_pydicom(builders: ModuleType) -> None:
    ds = builders.build_series(1, 1)[0][0][0]
    good = part10(ds, ExplicitVRLittleEndian)
    assert read_lean(good) is not None
    assert read_lean(good[128:]) is None  # no preamble
    assert read_lean(good[:-7]) is None  # cut
    latin = copy.deepcopy(ds)
    latin.SpecificCharacterSet = "ISO_IR 100"
    latin.SeriesDescription = "r\xe9pos"
    assert read_lean(part10(latin, ExplicitVRLittleEndian)) is None
    # ASCII bytes with an ISO 2022 escape: pydicom would switch character sets.
    escaped = copy.deepcopy(ds)
    escaped.SeriesDescription = "rest \x1b(B"
    assert read_lean(part10(escaped, ExplicitVRLittleEndian)) is None
    # A UID with a stray tab in front (hypothesis found it): pydicom's UID strips it.
    # (0008,0018) SOPInstanceUID, explicit VR; its length varies with the generated UID.
    value = str(ds.SOPInstanceUID).encode("ascii")
    value += b"\x00" * (len(value) % 2)
    sop_uid = b"\x08\x00\x18\x00UI" + struct.pack("<H", len(value)) + b"1.2"
    tabbed = part10(ds, ExplicitVRLittleEndian).replace(sop_uid, sop_uid[:-3] + b"\t.2", 1)
    assert tabbed != part10(ds, ExplicitVRLittleEndian)
    lean_tabbed = read_lean(tabbed)
    assert lean_tabbed is not None
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        assert lean_tabbed.get(keyword) == pydicom.dcmread(io.BytesIO(tabbed)).get(keyword)
    odd = copy.deepcopy(ds)
    odd.SliceThickness = "9.25"
    data = part10(odd, ImplicitVRLittleEndian)
    assert read_lean(data) is not None
    assert read_lean(data.replace(b"9.25", b"9,25")) is None  # not a number
    # An element whose VR is not the dictionary's (pydicom converts UN itself).
    data = bytearray(good)
    at = data.find(b"\x20\x00\x37\x00DS")  # ImageOrientationPatient, explicit VR
    assert at > 0
    data[at + 4 : at + 6] = b"LO"
    assert read_lean(bytes(data)) is None
    other = bytearray(good)  # the same bytes under a syntax it does not read
    at = other.find(ExplicitVRLittleEndian.encode())
    other[at : at + 19] = b"1.2.840.10008.1.2.2"  # big endian
    assert read_lean(bytes(other)) is None


def test_the_ingest_reads_lean_when_it_can(builders: ModuleType, pydicom_data: Path) -> None:
    (ds,) = builders.build_series(1, 1)[0][0]
    simple = Received(Path("x.dcm"), ds.SOPClassUID, ds.SOPInstanceUID, 0.0,
                      encoded=part10(ds, ExplicitVRLittleEndian))  # fmt: skip
    assert isinstance(Ingest._read(simple), LeanDataset)
    raw = (pydicom_data / "MR_small_bigendian.dcm").read_bytes()
    other = Received(Path("y.dcm"), "1.2.840.10008.5.1.4.1.1.4", "1.2", 0.0, encoded=raw)
    assert isinstance(Ingest._read(other), Dataset)


def test_decoding_reads_no_element_the_lean_reader_leaves_out() -> None:
    """Every keyword the decoding path asks a dataset for is one it reads."""
    used: set[str] = set()
    for module in ("slices", "mosaic", "elements", "pixels", "selector", "ingest"):
        source = (ROOT / "receiver" / f"{module}.py").read_text()
        used |= set(re.findall(r"\b(?:ds|item)\.get\(\s*\"(\w+)\"", source))
        for names in re.findall(r"for keyword in \(([^)]*)\)", source):
            used |= set(re.findall(r"\"(\w+)\"", names))
    assert {"ImageType", "SliceThickness", "PixelSpacing"} <= used  # the scan works
    assert used <= set(KEYWORDS), used - set(KEYWORDS)


@pytest.fixture(scope="module")
def small_files() -> list[bytes]:
    run = make_phantom_run(n_volumes=1, shape=(12, 10, 4), orientation="oblique")
    spec = SeriesSpec(tr_s=2.0, n_volumes=3)
    out = []
    for encoding in ("slice", "mosaic"):
        ds = encode_volume(run.volume(0), run.vox2ras, spec, 0, encoding=encoding)[0]
        out += [part10(ds, syntax) for syntax in SYNTAXES.values()]
    return out


def _reference(data: bytes) -> Any:
    """What the pydicom path makes of the bytes: fragments, or its error."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        return f"unreadable: {type(exc).__name__}"
    try:
        return _outcome(ds)
    except Exception as exc:
        return f"raised: {type(exc).__name__}"


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")  # damaged on purpose
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, 3),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_damaged_bytes_are_read_as_pydicom_reads_them_or_not_at_all(
    small_files: list[bytes], which: int, flips: list[tuple[float, int]]
) -> None:
    data = bytearray(small_files[which])
    header_end = len(data) - 12 * 10 * 4 * 2 * (4 if which >= 2 else 1) - 200
    for where, value in flips:  # in the elements, not deep in the pixels
        data[min(len(data) - 1, 132 + int(where * max(1, header_end - 132)))] = value
    lean = read_lean(bytes(data))
    if lean is None:
        return
    _same_fragments(_outcome(lean), _reference(bytes(data)))
