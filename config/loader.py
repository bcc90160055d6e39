"""Build :class:`Settings` from TOML, environment and command-line overrides."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from boldstream.config.settings import Settings
from boldstream.errors import ConfigError

__all__ = ["ENV_PREFIX", "load_settings", "parse_override"]

ENV_PREFIX = "BOLDSTREAM_"


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    parts = [p for p in dotted.split(".") if p]
    if len(parts) < 2:
        raise ConfigError(f"{dotted}: a setting is named <section>.<key>, e.g. receiver.port")
    node: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        node = {part: node}
    return node


def _parse_scalar(text: str) -> Any:
    """Read an environment/CLI value as TOML when it parses, else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_override(item: str) -> dict[str, Any]:
    """``"receiver.port=104"`` -> ``{"receiver": {"port": 104}}``."""
    key, sep, value = item.partition("=")
    if not sep:
        raise ConfigError(f"{item}: an override is written <section>.<key>=<value>")
    return _nest(key.strip(), _parse_scalar(value.strip()))


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        out = _merge(out, _nest(dotted, _parse_scalar(value)))
    return out


def load_settings(
    path: Path | None = None,
    *,
    overrides: Sequence[str | Mapping[str, Any]] = (),
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Defaults < TOML file < environment < overrides, validated once.

    Raises :class:`ConfigError` naming the bad key on any problem.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{path}: configuration file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    raw = _merge(raw, _from_env(os.environ if environ is None else environ))
    for item in overrides:
        raw = _merge(raw, parse_override(item) if isinstance(item, str) else item)
    try:
        return Settings.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown setting"
            problems.append(f"{key}: {msg}")
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid settings{where}: " + "; ".join(problems)) from None
