"""The simulated scanner: phantom run, DICOM encoders, C-STORE sender."""

from __future__ import annotations

__all__: list[str] = []
