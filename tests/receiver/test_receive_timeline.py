"""``benchmarks/receive_timeline.py`` still finds every mark it splits the round trip at.

The script times pynetdicom's socket calls, boldstream's handler, the spool
and the response by wrapping them by name; a rename on either side would
leave it with nothing to time. Run as a process (the wrappers patch classes
for good) with storescu sending two small volumes; no timing is checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "receive_timeline.py"


@pytest.mark.parametrize("direct_store", ["on", "off"])
def test_every_instance_is_timed_at_every_mark(direct_store: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--volumes", "2", "--direct-store", direct_store],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sent = re.search(r"(\d+) instances, .* (\d+) instances timed", proc.stdout)
    assert sent is not None, proc.stdout
    # Two 60-slice volumes, 5 sent first to warm up; the first response of the
    # flood only opens the first interval.
    assert int(sent.group(1)) == 115 and int(sent.group(2)) == 114, proc.stdout
    assert f"direct_store = {'true' if direct_store == 'on' else 'false'}" in proc.stdout
    for part in ("reading the PDUs", "durable write (Spool.store)", "round trip"):
        row = re.search(rf"\| {re.escape(part)}\s*\| ([0-9.]+)\s*\| ([0-9.]+)", proc.stdout)
        assert row is not None and float(row.group(1)) > 0, (part, proc.stdout)
