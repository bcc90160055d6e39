"""ZeroMQ plumbing: message codec, stages, supervision, ordering."""

from __future__ import annotations

__all__: list[str] = []
