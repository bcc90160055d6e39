"""Fuzzing the decoder and assembler: strange headers raise DicomInputError only.

Valid instances of the three encodings (a per-slice series, a Philips-style
multi-volume enhanced MR, a real Siemens mosaic) get some of their elements
deleted or replaced by raw bytes: random garbage or odd but well-formed
values (zero, huge, negative, NaN, wrong multiplicity). Replacements are
pydicom raw elements, decoded on first access exactly as a dataset that came
over the network is, then fed straight to decode_instance and
Assembler.add (no network: fast), as the ingest thread would, including
the series selector and the timeouts. The only exception allowed out is
DicomInputError.
"""

from __future__ import annotations

import copy
import functools
import struct
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import generate_uid

from boldstream.config.settings import AssemblySettings, SelectorSettings
from boldstream.errors import DicomInputError
from boldstream.receiver.assembly import Assembler
from boldstream.receiver.decode import decode_instance
from boldstream.receiver.selector import SeriesSelector

pytestmark = [
    pytest.mark.timeout(120),
    # pydicom warns about every invalid value it is fed (that is the point)...
    pytest.mark.filterwarnings("ignore::UserWarning"),
    # ...and numpy about overflow on 1e308-sized orientations, before they are refused.
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,
)
ASSEMBLY = AssemblySettings()
SELECTOR = SeriesSelector(SelectorSettings(exclude_image_types=()))

# -- raw values ----------------------------------------------------------------


def _text(values: list[str]) -> bytes:
    raw = "\\".join(values).encode("latin-1", "replace")
    return raw + b" " * (len(raw) % 2)


def _us(values: list[int]) -> bytes:
    return b"".join(struct.pack("<H", v) for v in values)


_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e308, -1e-320, 65536.0]),
)
_DS = st.lists(_NUMBERS, min_size=0, max_size=8).map(lambda xs: _text([f"{x:.6g}" for x in xs]))
_IS = st.lists(st.integers(-(2**40), 2**40), min_size=0, max_size=3).map(
    lambda xs: _text([str(x) for x in xs])
)
_US = st.lists(st.integers(0, 65535), min_size=0, max_size=3).map(_us)
_WORDS = st.lists(
    st.sampled_from(["", " ", "NaN", "1e400", "abc", "-", "1.5", "\x00", "MOSAIC", "M", "PHASE"]),
    min_size=0,
    max_size=4,
).map(_text)
_GARBAGE = st.binary(min_size=0, max_size=40)
_UIDS = st.sampled_from(
    [
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.2",  # explicit VR big endian
        "1.2.840.10008.1.2.1.99",  # deflated
        "1.2.840.10008.1.2.4.50",  # JPEG baseline: pixel data not a JPEG
        "1.2.840.10008.1.2.4.90",
        "1.2.3.4",
        "",
    ]
)

#: keyword -> strategy of a plausible-but-wrong raw value.
_TYPED: dict[str, st.SearchStrategy[bytes]] = {
    "Rows": _US,
    "Columns": _US,
    "BitsAllocated": _US,
    "BitsStored": _US,
    "SamplesPerPixel": _US,
    "PixelRepresentation": _US,
    "PixelSpacing": _DS,
    "ImageOrientationPatient": _DS,
    "ImagePositionPatient": _DS,
    "SliceThickness": _DS,
    "SpacingBetweenSlices": _DS,
    "RescaleSlope": _DS,
    "RescaleIntercept": _DS,
    "RepetitionTime": _DS,
    "NumberOfFrames": _IS,
    "InstanceNumber": _IS,
    "AcquisitionNumber": _IS,
    "ImagesInAcquisition": _IS,
    "NumberOfTemporalPositions": _IS,
    "TemporalPositionIdentifier": _IS,
    "TemporalPositionIndex": st.lists(st.integers(0, 2**32 - 1), max_size=2).map(
        lambda xs: b"".join(struct.pack("<I", x) for x in xs)
    ),
    "AcquisitionTime": _WORDS,
    "FrameAcquisitionDateTime": _WORDS,
    "PhotometricInterpretation": st.sampled_from(
        [b"RGB ", b"MONOCHROME1 ", b"PALETTE COLOR ", b""]
    ),
    "ImageType": _WORDS,
    "Manufacturer": st.sampled_from([b"SIEMENS ", b"Philips ", b"GE MEDICAL SYSTEMS", b""]),
    "SeriesInstanceUID": st.sampled_from([b"", b"1.2.3", b"\x00\x00", b"abc "]),
    "SOPClassUID": st.sampled_from(
        [b"1.2.840.10008.5.1.4.1.1.4\x00", b"1.2.840.10008.5.1.4.1.1.4.1\x00", b"1.2\x00"]
    ),
    "PixelData": st.one_of(_GARBAGE, st.integers(0, 600).map(lambda n: b"\x01" * n)),
}


def _raw(tag: BaseTag, value: bytes) -> RawDataElement:
    return RawDataElement(tag, None, len(value), value, 0, True, True)


@st.composite
def mutations(draw: st.DrawFn, keywords: list[str]) -> list[tuple[str, bytes | None]]:
    """Up to four (keyword, new raw value or None for deleted) changes."""
    chosen = draw(st.lists(st.sampled_from(keywords), min_size=1, max_size=4, unique=True))
    out: list[tuple[str, bytes | None]] = []
    for keyword in chosen:
        kind = draw(st.sampled_from(["delete", "garbage", "typed", "typed"]))
        if kind == "delete":
            out.append((keyword, None))
        elif kind == "garbage":
            out.append((keyword, draw(_GARBAGE)))
        else:
            out.append((keyword, draw(_TYPED.get(keyword, _GARBAGE))))
    return out


def _apply(item: Dataset, changes: list[tuple[str, bytes | None]]) -> None:
    for keyword, value in changes:
        tag = Tag(keyword)
        if value is None:
            if tag in item:
                del item[tag]
        else:
            item[tag] = _raw(tag, value)


def _run(datasets: list[Dataset]) -> None:
    """The ingest path: selector, decode, assemble, expire; DicomInputError only."""
    assembler = Assembler(ASSEMBLY)
    now = 1000.0
    for ds in datasets:
        try:
            SELECTOR.decide(ds, str(ds.get("SOPClassUID", "")))
            fragments = decode_instance(ds, assembly=ASSEMBLY)
            assembler.add(fragments, received=now)
        except DicomInputError:
            pass
        now += 0.01
    assembler.expire(now + 5.0)  # learns slice counts, closes as incomplete
    assembler.expire(now + ASSEMBLY.volume_timeout_s + ASSEMBLY.series_idle_timeout_s + 1)


def _transfer(ds: Dataset, uid: str | None) -> None:
    if uid is not None:
        ds.file_meta.TransferSyntaxUID = uid


# -- per-slice series --------------------------------------------------------------

_SLICE_KEYWORDS = [
    k for k in _TYPED if k not in ("TemporalPositionIndex", "FrameAcquisitionDateTime")
]


@FUZZ
@given(
    changes=mutations(_SLICE_KEYWORDS),
    victim=st.integers(0, 7),
    second=st.none() | mutations(_SLICE_KEYWORDS),
    transfer=st.none() | _UIDS,
    order=st.permutations(range(8)),
)
def test_per_slice_series(
    builders: ModuleType,
    changes: list[tuple[str, bytes | None]],
    victim: int,
    second: list[tuple[str, bytes | None]] | None,
    transfer: str | None,
    order: list[int],
) -> None:
    volumes, _ = builders.build_series(2, 4, rows=6, cols=5, images_in_acquisition=4)
    flat = [ds for volume in volumes for ds in volume]
    _apply(flat[victim], changes)
    _transfer(flat[victim], transfer)
    if second is not None:
        _apply(flat[(victim + 3) % 8], second)
    _run([flat[k] for k in order])


# -- enhanced MR ------------------------------------------------------------------

_ENHANCED_TOP = [
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
    "InstanceNumber",
    "PixelData",
    "PhotometricInterpretation",
    "SOPClassUID",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
]
#: (sequence in a functional group item, keyword inside its first item)
_GROUP_ELEMENTS = [
    ("PlanePositionSequence", "ImagePositionPatient"),
    ("PlaneOrientationSequence", "ImageOrientationPatient"),
    ("PixelMeasuresSequence", "PixelSpacing"),
    ("PixelMeasuresSequence", "SliceThickness"),
    ("FrameContentSequence", "TemporalPositionIndex"),
    ("FrameContentSequence", "FrameAcquisitionDateTime"),
    ("PixelValueTransformationSequence", "RescaleSlope"),
    ("MRTimingAndRelatedParametersSequence", "RepetitionTime"),
]


@st.composite
def group_changes(draw: st.DrawFn) -> list[tuple[str, int, str, str, bytes | None]]:
    """(where: shared/per-frame, frame, sequence, keyword, value) changes."""
    out = []
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["shared", "frame"]))
        frame = draw(st.integers(0, 5))
        sequence, keyword = draw(st.sampled_from(_GROUP_ELEMENTS))
        kind = draw(
            st.sampled_from(["delete-item", "empty-sequence", "delete", "typed", "garbage"])
        )
        value: bytes | None = None
        if kind == "typed":
            value = draw(_TYPED[keyword])
        elif kind == "garbage":
            value = draw(_GARBAGE)
        out.append(
            (
                where,
                frame,
                sequence,
                keyword if kind not in ("delete-item", "empty-sequence") else kind,
                value,
            )
        )
    return out


def _apply_group(ds: Dataset, change: tuple[str, int, str, str, bytes | None]) -> None:
    where, frame, sequence, keyword, value = change
    groups = (
        ds.get("SharedFunctionalGroupsSequence")
        if where == "shared"
        else ds.get("PerFrameFunctionalGroupsSequence")
    )
    if not groups:
        return
    item = groups[min(frame, len(groups) - 1)]
    if keyword == "delete-item":
        if sequence in item:
            del item[sequence]
        return
    if keyword == "empty-sequence":
        setattr(item, sequence, pydicom.Sequence([]))
        return
    if sequence not in item:
        setattr(item, sequence, pydicom.Sequence([Dataset()]))
    seq = item[sequence].value
    if not seq:
        return
    _apply(seq[0], [(keyword, value)])


@FUZZ
@given(
    top=st.none() | mutations(_ENHANCED_TOP),
    groups=group_changes(),
    transfer=st.none() | _UIDS,
)
def test_enhanced_mr(
    builders: ModuleType,
    top: list[tuple[str, bytes | None]] | None,
    groups: list[tuple[str, int, str, str, bytes | None]],
    transfer: str | None,
) -> None:
    iop = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    positions = builders.stack_positions(iop, (0.0, 0.0, 0.0), 3, 2.0)
    frames = np.arange(6 * 4 * 5, dtype=np.uint16).reshape(6, 4, 5)
    uid = generate_uid()
    good = builders.build_enhanced(
        frames,
        np.concatenate([positions, positions]),
        series_uid=uid,
        iop=iop,
        temporal_indices=[1, 1, 1, 2, 2, 2],
    )
    bad = copy.deepcopy(good)
    bad.SOPInstanceUID = generate_uid()
    for change in groups:
        _apply_group(bad, change)
    if top is not None:
        _apply(bad, top)
    _transfer(bad, transfer)
    # A good instance first, so the bad one is also checked against its series.
    _run([good, bad])


# -- Siemens mosaic (real file, CSA header bytes fuzzed) --------------------------------

_CSA_IMAGE = Tag(0x0029, 0x1010)
_CSA_SERIES = Tag(0x0029, 0x1020)


@functools.lru_cache(maxsize=1)
def _mosaic(path: Path) -> Dataset:
    ds = pydicom.dcmread(path)
    ds.decode()
    return ds


@st.composite
def csa_changes(draw: st.DrawFn) -> tuple[str, int, bytes]:
    kind = draw(st.sampled_from(["truncate", "flip", "replace", "splice"]))
    return kind, draw(st.integers(0, 20000)), draw(st.binary(min_size=1, max_size=64))


def _fuzz_csa(original: bytes, change: tuple[str, int, bytes]) -> bytes:
    kind, at, data = change
    at %= max(len(original), 1)
    if kind == "truncate":
        return original[:at]
    if kind == "flip":
        return original[:at] + bytes(b ^ 0xFF for b in data[:4]) + original[at + 4 :]
    if kind == "splice":
        return original[:at] + data + original[at:]
    return data


_MOSAIC_KEYWORDS = [
    "Rows",
    "Columns",
    "BitsAllocated",
    "PixelSpacing",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "InstanceNumber",
    "AcquisitionNumber",
    "ImageType",
    "PixelData",
    "SpacingBetweenSlices",
]


@FUZZ
@given(
    csa=st.none() | csa_changes(),
    series_csa=st.none() | csa_changes(),
    changes=st.none() | mutations(_MOSAIC_KEYWORDS),
)
def test_siemens_mosaic(
    mosaic_path: Path,
    csa: tuple[str, int, bytes] | None,
    series_csa: tuple[str, int, bytes] | None,
    changes: list[tuple[str, bytes | None]] | None,
) -> None:
    ds = copy.deepcopy(_mosaic(mosaic_path))
    for tag, change in ((_CSA_IMAGE, csa), (_CSA_SERIES, series_csa)):
        if change is not None and tag in ds:
            value = _fuzz_csa(bytes(ds[tag].value), change)
            ds[tag] = RawDataElement(tag, "OB", len(value), value, 0, False, True)
    if changes is not None:
        _apply(ds, changes)
    following = copy.deepcopy(_mosaic(mosaic_path))
    following.InstanceNumber = int(following.InstanceNumber) + 1
    _run([ds, following])


# -- regressions found by the fuzzer ------------------------------------------------


def _slice(builders: ModuleType, changes: list[tuple[str, bytes | None]]) -> Dataset:
    volumes, _ = builders.build_series(1, 2, rows=6, cols=5, images_in_acquisition=2)
    ds: Dataset = volumes[0][0]
    _apply(ds, changes)
    return ds


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        # int(None) on an empty element, len(None) on empty Pixel Data.
        ([("SamplesPerPixel", b"")], "pixel"),
        ([("PixelData", b"")], "pixel data is 0 bytes"),
        # pydicom raised on first access: BytesLengthException; AttributeError
        # (the VR of implicit Pixel Data depends on an absent BitsAllocated).
        ([("Rows", b"\x00\x00\x00")], "Rows cannot be read"),
        # Read by the native pixel path only, once left out of the up-front reads.
        ([("PixelRepresentation", b"\x00" * 19)], "PixelRepresentation cannot be read"),
        ([("BitsStored", b"\x00" * 3)], "BitsStored cannot be read"),
        ([("PixelData", b""), ("BitsAllocated", None)], "PixelData cannot be read.*BitsAllocated"),
        # UID.is_compressed raises ValueError for a UID that is no transfer syntax.
        ([], "unknown transfer syntax"),
    ],
)
def test_regression_header_reads_raise_input_errors(
    builders: ModuleType, changes: list[tuple[str, bytes | None]], message: str
) -> None:
    ds = _slice(builders, changes)
    if not changes:
        ds.file_meta.TransferSyntaxUID = "1.2.3.4"
    with pytest.raises(DicomInputError, match=message):
        decode_instance(ds, assembly=ASSEMBLY)


def test_regression_garbage_functional_group_sequence(builders: ModuleType) -> None:
    iop = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    ds = builders.build_enhanced(
        np.zeros((2, 4, 5), dtype=np.uint16),
        builders.stack_positions(iop, (0.0, 0.0, 0.0), 2, 2.0),
        series_uid=generate_uid(),
        iop=iop,
        temporal_indices=[1, 1],
    )
    _apply(ds, [("SharedFunctionalGroupsSequence", b"\x00")])  # pydicom: OSError
    with pytest.raises(DicomInputError, match="SharedFunctionalGroupsSequence cannot be read"):
        decode_instance(ds, assembly=ASSEMBLY)


@pytest.mark.parametrize("position", [b"0\\nan\\0 ", b"0\\0\\inf ", b"0\\0\\1e+308 "])
def test_regression_non_finite_or_huge_position(builders: ModuleType, position: bytes) -> None:
    # Once: ValueError/OverflowError from round() in Assembler._insert.
    ds = _slice(builders, [("ImagePositionPatient", position)])
    fragments = decode_instance(ds, assembly=ASSEMBLY)
    assembler = Assembler(ASSEMBLY)
    with pytest.raises(DicomInputError, match="ImagePositionPatient is not finite or beyond"):
        assembler.add(fragments, received=1.0)
    assert assembler.pending_volumes == 0


def test_fuzz_harness_sees_the_good_cases(builders: ModuleType) -> None:
    """Unchanged inputs assemble: the fuzzer starts from valid data."""
    volumes, _ = builders.build_series(2, 4, rows=6, cols=5, images_in_acquisition=4)
    assembler = Assembler(ASSEMBLY)
    events = []
    for ds in [d for v in volumes for d in v]:
        events += assembler.add(decode_instance(ds, assembly=ASSEMBLY), received=1.0)
    assert [e.index for e in events] == [0, 1]
