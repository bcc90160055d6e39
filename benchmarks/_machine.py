"""What machine a benchmark ran on, for the tables in docs/benchmarks.md."""

from __future__ import annotations

import datetime as _dt
import os
import platform


def machine_line() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            kb = int(fh.readline().split()[1])
            mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    today = _dt.date.today().isoformat()
    return (
        f"{today}, {os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def numerics_line() -> str:
    """numpy's version and the BLAS thread setting (numerical benchmarks depend on both)."""
    import numpy as np

    blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    return f"numpy {np.__version__}, OPENBLAS_NUM_THREADS={blas}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (pasted as is into docs/benchmarks.md)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join([line, sep, *body])
