"""The typed, validated settings and their TOML loader."""

from __future__ import annotations

from boldstream.config.loader import load_settings, parse_override
from boldstream.config.settings import (
    AssemblySettings,
    LoggingSettings,
    ReceiverSettings,
    SelectorSettings,
    Settings,
)

__all__ = [
    "AssemblySettings",
    "LoggingSettings",
    "ReceiverSettings",
    "SelectorSettings",
    "Settings",
    "load_settings",
    "parse_override",
]
