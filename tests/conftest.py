"""Shared fixtures: locations of real sample DICOM files that ship in PyPI packages.

- pydicom's test files (``MR_small.dcm``: one classic MR slice);
- nibabel's ``nicom/tests/data`` (Siemens mosaics ``0.dcm``/``1.dcm``; pixels zeroed);
- heudiconv's ``tests/data`` (a Siemens EPI mosaic ``axasc35.dcm``, three
  consecutive DWI mosaics of one series, a Siemens XA Enhanced MR). heudiconv is
  installed with ``--no-deps`` by .ci/run only for these files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from peers import require_tool

__all__ = ["require_tool"]


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


@pytest.fixture(scope="session")
def pydicom_data() -> Path:
    root = _package_dir("pydicom")
    assert root is not None
    return root / "data" / "test_files"


@pytest.fixture(scope="session")
def nibabel_data() -> Path:
    root = _package_dir("nibabel")
    assert root is not None
    return root / "nicom" / "tests" / "data"


@pytest.fixture(scope="session")
def heudiconv_data() -> Path:
    root = _package_dir("heudiconv")
    if root is None:
        pytest.fail("heudiconv's test data is needed: pip install --no-deps heudiconv==1.5.1")
    return root / "tests" / "data"
