"""A short load run: 4 scanners at once, 2 small per-slice series each, ~25 s.

Runs ``benchmarks/load.py`` as a process (its own receiver + pipeline in
process mode, four sender processes with one association each, loopback):
every volume the senders had acknowledged must come out as a ``qc`` result
(zero lost), with bounded latency and no drops at the counting subscriber.
Each series states its length in its header, so each ends as soon as its
last volume is in (not after the idle time).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load.py"


def test_four_scanners_two_series_each_lose_nothing(tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    argv = [
        sys.executable, str(SCRIPT),
        "--scanners", "4", "--series", "2", "--volumes", "15", "--minutes", "0.75",
        "--shape", "40x40x24", "--voxel-mm", "4.5", "--tr", "0.8", "--pace", "1",
        "--drain-s", "60", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert out.exists(), proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["errors"] == [], r["errors"]
    assert proc.returncode == 0, proc.stdout[-2000:]
    # Four associations at 4 x 24 / 0.8 = 120 instances/s, 2 x 15 volumes each
    # (24 s of sending at this pace; the run stops sending at 45 s).
    assert r["volumes_sent"] == r["volumes_planned"] == 4 * 2 * 15
    # Every series ended by its stated count, while the run went on.
    assert r["series_ended"] == {"complete": 8}
    assert r["instances_failed"] == 0
    assert r["volumes_received"] == r["volumes_sent"]
    assert r["volumes_processed"] == r["volumes_sent"]
    assert r["volumes_lost"] == 0 and r["missing"] == 0
    assert r["subscriber_dropped"] == 0
    # Well inside one TR at the median; the tail bounded on a shared 2-core machine.
    assert r["latency_p50_ms"] < 800
    assert r["latency_p99_ms"] < 5000
    assert "| pace | inst/s asked |" in proc.stdout  # the printed table
