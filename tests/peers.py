"""Helpers for tests that use real external peers (DCMTK, dcm2niix, Chromium)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["free_port", "require_tool", "storescp_peer"]


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


@contextlib.contextmanager
def storescp_peer(out: Path, *, ae_title: str = "TESTPACS") -> Iterator[int]:
    """DCMTK's storescp writing into ``out`` on a free port; yields the port once it listens."""
    port = free_port()
    proc = subprocess.Popen(
        [require_tool("storescp"), "-aet", ae_title, "-od", str(out), "+uf", "-fe", ".dcm",
         str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10.0
        while True:  # until it accepts connections (bounded)
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    output = proc.stdout.read().decode() if proc.stdout else ""
                    pytest.fail(f"storescp did not start on port {port}: {output}")
                time.sleep(0.02)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5.0)
