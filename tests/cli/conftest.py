"""Fixtures for the command tests: DCMTK's storescp as a PACS on a free port."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import storescp_peer


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    out = tmp_path / "received"
    out.mkdir()
    with storescp_peer(out) as port:
        yield port, out
