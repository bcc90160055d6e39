"""Everything out: PUB streams, files, dashboard, exports."""

from __future__ import annotations

__all__: list[str] = []
