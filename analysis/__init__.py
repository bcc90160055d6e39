"""Pure numerics on arrays: motion, QC, connectivity, registration, target."""

from __future__ import annotations

__all__: list[str] = []
