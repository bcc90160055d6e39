"""The handler's fast header walk agrees with pydicom, or steps aside.

:func:`scan_header` reads the values the C-STORE handler checks without
decoding the dataset; it must give exactly what pydicom's decoding gives
(:func:`header_from_dataset`), or ``None`` so that pydicom decides. Checked
on every sample file shipped with pydicom, nibabel and heudiconv, in the
transfer syntax each was written in, on the simulator's three encodings,
on hand-made streams (nested undefined-length sequences, UN holding an
implicit-VR sequence) and on every truncation of a real instance.
:func:`part10_bytes` must write the same bytes as pynetdicom.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from boldstream.receiver.header import (
    InstanceHeader,
    header_from_dataset,
    pixel_data_problem,
    scan_header,
)
from boldstream.receiver.part10 import part10_bytes
from boldstream.simulator.phantom import make_phantom_run
from boldstream.simulator.send import SendOptions, write_run

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::UserWarning")]


def _split(path: Path) -> tuple[bytes, str]:
    """A Part 10 file's dataset bytes (after the file meta) and transfer syntax."""
    data = path.read_bytes()
    fp = io.BytesIO(data)
    read_preamble(fp, force=True)
    meta = _read_file_meta_info(fp)
    syntax = str(meta.get("TransferSyntaxUID", ImplicitVRLittleEndian))
    return data[fp.tell() :], syntax


def _decoded(dataset: bytes, syntax: str) -> InstanceHeader:
    """What the handler's slow path reads from the same bytes."""
    ds = pydicom.dcmread(
        io.BytesIO(
            part10_bytes(
                dataset, sop_class_uid="1.2", sop_instance_uid="1.3", transfer_syntax=syntax
            )
        )
    )
    return header_from_dataset(ds, syntax)


def _samples(pydicom_data: Path, nibabel_data: Path, heudiconv_data: Path) -> list[Path]:
    paths = sorted(pydicom_data.glob("*.dcm")) + sorted(nibabel_data.glob("*.dcm"))
    return paths + sorted(heudiconv_data.rglob("*.dcm"))


def test_every_shipped_sample_agrees_with_pydicom_or_steps_aside(
    pydicom_data: Path, nibabel_data: Path, heudiconv_data: Path
) -> None:
    walked: set[str] = set()
    stepped_aside: set[str] = set()
    for path in _samples(pydicom_data, nibabel_data, heudiconv_data):
        try:
            dataset, syntax = _split(path)
            expected = _decoded(dataset, syntax)
        except Exception:  # pydicom cannot read it either: the handler refuses it anyway
            continue
        header = scan_header(dataset, syntax)
        if header is None:
            stepped_aside.add(path.name)
            continue
        walked.add(path.name)
        assert header == expected, path.name
    # The MR the scanner sends, in every little-endian syntax, is walked; big
    # endian, deflated and cut streams are left to pydicom.
    assert {
        "MR_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_padded.dcm",
        "UN_sequence.dcm",
        "nested_priv_SQ.dcm",
        "priv_SQ.dcm",
        "axasc35.dcm",
        "0.dcm",
    } <= walked
    assert {"MR_small_bigendian.dcm", "image_dfl.dcm", "MR_truncated.dcm"} <= stepped_aside
    assert len(walked) > 50


def _encode(ds: Dataset, syntax: str) -> bytes:
    """The bare dataset (no preamble, no file meta) in ``syntax``."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    return fp.getvalue()


@pytest.mark.parametrize("encoding", ["slice", "mosaic", "enhanced"])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_simulator_output_in_both_little_endian_syntaxes(
    tmp_path: Path, encoding: str, syntax: str
) -> None:
    run = make_phantom_run(n_volumes=1, tr_s=2.0, shape=(16, 16, 6), voxel_mm=3.0)
    for path in write_run(run, tmp_path, SendOptions(encoding=encoding), truth=False):  # type: ignore[arg-type]
        dataset = _encode(pydicom.dcmread(path), syntax)
        header = scan_header(dataset, syntax)
        assert header is not None
        assert header == _decoded(dataset, syntax)
        assert header.rows and header.columns and header.pixel_bytes
        assert pixel_data_problem(header) is None


def _image(**extra: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 3, 5
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = b"\x01\x00" * 15
    return ds


@pytest.mark.parametrize("undefined", [True, False])
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_nested_sequences(syntax: str, undefined: bool) -> None:
    inner = Dataset()
    inner.ReferencedSOPInstanceUID = generate_uid()
    inner.ReferencedFrameNumber = "1"
    outer = Dataset()
    outer.ReferencedImageSequence = Sequence([inner, inner])
    ds = _image(ReferencedSeriesSequence=Sequence([outer, Dataset()]))
    for item in (inner, outer, *ds.ReferencedSeriesSequence):
        item.is_undefined_length_sequence_item = undefined
    ds["ReferencedSeriesSequence"].is_undefined_length = undefined
    outer["ReferencedImageSequence"].is_undefined_length = undefined
    data = _encode(ds, syntax)
    assert (data.count(b"\xfe\xff\xdd\xe0") == 2) is undefined  # sequence delimiters
    assert (data.count(b"\xfe\xff\x0d\xe0") == 4) is undefined  # item delimiters
    header = scan_header(data, syntax)
    assert header is not None
    assert header == _decoded(data, syntax)
    assert header.sop_instance_uid == ds.SOPInstanceUID and header.pixel_bytes == 30


def test_un_of_undefined_length_holds_an_implicit_sequence() -> None:
    """PS3.5 6.2.2: an unknown sequence sent as UN keeps implicit VR inside."""
    ds = _image()
    data = _encode(ds, ExplicitVRLittleEndian)
    element = struct.pack("<HHI", 0x0008, 0x1155, 10) + b"1.2.3.4.5\x00"  # implicit VR
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + element
    item += struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    un = struct.pack("<HH2sHI", 0x0019, 0x1001, b"UN", 0, 0xFFFFFFFF) + item
    un += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    creator = struct.pack("<HH2sH", 0x0019, 0x0010, b"LO", 4) + b"ACME"
    cut = data.index(struct.pack("<HH", 0x0020, 0x000D))  # insert before group 0x0020
    stream = data[:cut] + creator + un + data[cut:]
    header = scan_header(stream, ExplicitVRLittleEndian)
    assert header is not None
    assert header == _decoded(stream, ExplicitVRLittleEndian)


def test_every_cut_of_a_real_instance_is_refused_or_left_to_pydicom(pydicom_data: Path) -> None:
    """A cut inside an element steps aside; one between elements reads as pydicom does."""
    dataset, syntax = _split(pydicom_data / "MR_small.dcm")
    whole = scan_header(dataset, syntax)
    assert whole is not None and whole.pixel_bytes
    at_boundary = 0
    for end in range(1, len(dataset)):
        header = scan_header(dataset[:end], syntax)
        if header is None:
            continue
        at_boundary += 1
        # Before the pixels: the handler refuses an MR without them. After: all there.
        assert header.pixel_bytes in (None, whole.pixel_bytes)
        assert header == _decoded(dataset[:end], syntax)
    assert 10 < at_boundary < 200


@pytest.mark.parametrize(
    ("syntax", "why"),
    [
        (ExplicitVRBigEndian, "big endian"),
        (DeflatedExplicitVRLittleEndian, "deflated"),
        ("1.2.3.4.5", "not a transfer syntax"),
    ],
)
def test_syntaxes_it_does_not_read(syntax: str, why: str) -> None:
    assert scan_header(_encode(_image(), ExplicitVRLittleEndian), syntax) is None, why


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d + b"\x00\x00",  # trailing bytes that are no element
        lambda d: d.replace(b"UI", b"ZZ", 1),  # an unknown VR
        lambda d: struct.pack("<HHI", 0xFFFE, 0xE000, 0) + d,  # an item outside a sequence
    ],
)
def test_irregular_streams_are_left_to_pydicom(damage: object) -> None:
    data = _encode(_image(), ExplicitVRLittleEndian)
    assert scan_header(data, ExplicitVRLittleEndian) is not None
    assert scan_header(damage(data), ExplicitVRLittleEndian) is None  # type: ignore[operator]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"\x28\x00\x10\x00US\x02\x00", b"\x28\x00\x10\x00UN\x00\x00\x02\x00\x00\x00"),
        (b"\x28\x00\x10\x00US\x02\x00\x03\x00", b"\x28\x00\x10\x00US\x04\x00\x03\x00\x03\x00"),
    ],
    ids=["Rows as UN", "two Rows"],
)
def test_checked_elements_in_an_unexpected_form_are_left_to_pydicom(old: bytes, new: bytes) -> None:
    """pydicom reads a UN Rows by its dictionary VR; the walk would not."""
    data = _encode(_image(), ExplicitVRLittleEndian)
    assert old in data
    assert scan_header(data.replace(old, new, 1), ExplicitVRLittleEndian) is None


def test_native_pixels_under_a_compressed_syntax_are_left_to_pydicom() -> None:
    data = _encode(_image(), ExplicitVRLittleEndian)
    assert scan_header(data, "1.2.840.10008.1.2.4.50") is None


def test_pixel_problems_read_from_the_walked_header() -> None:
    for rows, word in ((4, "truncated"), (2, "disagree")):
        ds = _image()
        ds.Rows = rows
        header = scan_header(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
        assert header is not None
        problem = pixel_data_problem(header)
        assert problem is not None and word in problem
    ds = _image()
    del ds.Rows
    header = scan_header(_encode(ds, ImplicitVRLittleEndian), ImplicitVRLittleEndian)
    assert header is not None and "Rows, Columns or BitsAllocated missing" in str(
        pixel_data_problem(header)
    )


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45"])  # even and odd lengths
@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_part10_bytes_are_pynetdicoms(sop_uid: str, syntax: str) -> None:
    meta: FileMetaDataset = create_file_meta(
        sop_class_uid=pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.4"),
        sop_instance_uid=pydicom.uid.UID(sop_uid),
        transfer_syntax=pydicom.uid.UID(syntax),
    )
    body = _encode(_image(), syntax)
    theirs = b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + body
    ours = part10_bytes(
        body,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        sop_instance_uid=sop_uid,
        transfer_syntax=syntax,
    )
    assert ours == theirs
    assert pydicom.dcmread(io.BytesIO(ours)).file_meta.MediaStorageSOPInstanceUID == sop_uid
