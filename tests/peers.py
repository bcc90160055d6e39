"""Helpers for tests that use real external peers (DCMTK, dcm2niix, Chromium)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

__all__ = ["free_port", "require_tool"]


def _is_native_binary(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"\x7fELF"
    except OSError:
        return False


def require_tool(name: str) -> str:
    """Path of a native external peer (DCMTK's storescu, dcm2niix...).

    pynetdicom installs Python scripts called ``storescu``/``echoscu``/
    ``storescp`` that can shadow DCMTK's on PATH; only a native executable
    counts here. Fails (never skips) when the tool is absent.
    """
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / name
        if os.access(candidate, os.X_OK) and _is_native_binary(candidate):
            return str(candidate)
    pytest.fail(f"native {name} is not installed; .ci/run installs it with apt-get")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for peers that cannot bind port 0 themselves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
