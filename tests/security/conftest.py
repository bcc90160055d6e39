"""Fixtures of the security tests: key pairs, and the pipeline tests' helpers on sys.path."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

sys.path.insert(0, str(Path(__file__).parent.parent / "pipeline"))

from boldstream.stream.curve import write_keypair


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """Pairs ``server``, ``client`` (allowed), ``stranger``, ``impostor`` in tmp_path/keys."""
    folder = tmp_path / "keys"
    return {
        name: write_keypair(folder, name) for name in ("server", "client", "stranger", "impostor")
    }
