"""Our CSA2 writer against nibabel's reader."""

from __future__ import annotations

import numpy as np
import pytest
from nibabel.nicom import csareader

from boldstream.config.settings import AssemblySettings
from boldstream.receiver.decode import decode_instance, siemens_repetitions
from boldstream.simulator.csa import csa2_header
from boldstream.simulator.encode import SeriesSpec, encode_volume

pytestmark = pytest.mark.filterwarnings("ignore:The DICOM readers are highly experimental")


def test_round_trip_through_nibabel() -> None:
    times = [0.0, 1025.0, 57.5, 1082.5, 115.0]
    raw = csa2_header(
        {
            "NumberOfImagesInMosaic": ("IS", [5]),
            "SliceNormalVector": ("FD", [0.0, 0.25881904510252074, 0.9659258262890683]),
            "MosaicRefAcqTimes": ("FD", times),
            "AcquisitionMatrixText": ("SH", ["64p*64"]),
        }
    )
    csa = csareader.read(raw)
    assert csa["type"] == 2
    assert csa["n_tags"] == 4
    assert csareader.get_n_mosaic(csa) == 5
    assert csareader.get_acq_mat_txt(csa) == "64p*64"
    np.testing.assert_array_equal(
        csareader.get_slice_normal(csa), [0.0, 0.25881904510252074, 0.9659258262890683]
    )
    assert csa["tags"]["MosaicRefAcqTimes"]["items"] == times
    assert csareader.is_mosaic(csa)


def test_mosaic_carries_a_readable_csa_header() -> None:
    spec = SeriesSpec(tr_s=2.0, n_volumes=1, slice_order="ascending")
    vox2ras = np.diag([-3.0, -3.0, 3.0, 1.0])
    (ds,) = encode_volume(np.ones((8, 8, 5)), vox2ras, spec, 0, encoding="mosaic")
    csa = csareader.get_csa_header(ds)
    assert csa is not None and csareader.is_mosaic(csa)
    assert csareader.get_n_mosaic(csa) == 5
    np.testing.assert_allclose(
        csa["tags"]["MosaicRefAcqTimes"]["items"], [0.0, 400.0, 800.0, 1200.0, 1600.0]
    )
    np.testing.assert_allclose(csareader.get_slice_normal(csa), [0, 0, 1])


@pytest.mark.parametrize(("n_volumes", "stated"), [(200, 200), (1, None)])
def test_mosaic_states_its_run_length_as_siemens_does(n_volumes: int, stated: int | None) -> None:
    spec = SeriesSpec(tr_s=0.8, n_volumes=n_volumes, slice_order="ascending")
    vox2ras = np.diag([-3.0, -3.0, 3.0, 1.0])
    (ds,) = encode_volume(np.ones((8, 8, 5)), vox2ras, spec, 0, encoding="mosaic")
    series = csareader.get_csa_header(ds, "series")
    text = series["tags"]["MrPhoenixProtocol"]["items"][0]
    assert "### ASCCONV BEGIN ###" in text and "alTR[0]" in text
    assert siemens_repetitions(ds) == stated
    # ... and the receiver keeps it for the pipeline (which ends the series on it).
    (fragment,) = decode_instance(ds, assembly=AssemblySettings())
    assert fragment.series.n_volumes == stated
