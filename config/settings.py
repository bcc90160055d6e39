"""The typed, validated settings of boldstream.

One frozen object is built at start from, in increasing precedence: the
defaults below, a TOML file, ``BOLDSTREAM_<SECTION>__<KEY>`` environment
variables, and command-line overrides. Unknown keys are errors, and every
error names the key (``receiver.port: ...``).
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AssemblySettings",
    "LoggingSettings",
    "ReceiverSettings",
    "SelectorSettings",
    "Settings",
]

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII, no backslash


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_ae_title(value: str) -> str:
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError("an AE title is 1-16 printable ASCII characters, no backslash")
    return value.strip()


class ReceiverSettings(_Section):
    """The DICOM Storage SCP."""

    ae_title: str = "BOLDSTREAM"
    #: 104 is the registered DICOM port but needs root; 11112 is the usual
    #: unprivileged choice. 0 picks a free port (tests).
    port: int = Field(default=11112, ge=0, le=65535)
    bind: str = "127.0.0.1"
    spool_dir: Path = Path("spool")
    #: Calling AE titles allowed to associate; empty allows any.
    allowed_calling_aets: tuple[str, ...] = ()
    #: Peer IP addresses or networks (CIDR) allowed to connect; empty allows any.
    allowed_addresses: tuple[str, ...] = ()
    #: Associations served in parallel (each in its own thread).
    max_associations: int = Field(default=8, ge=1, le=64)
    #: Largest PDU we accept; 0 means unlimited.
    max_pdu_size: int = Field(default=0, ge=0)
    #: fsync each instance and its directory before answering success.
    fsync: bool = True
    #: Seconds a socket may stay silent before the association is aborted.
    network_timeout_s: float = Field(default=60.0, gt=0)
    #: Set TCP_NODELAY and re-arm TCP_QUICKACK on accepted sockets
    #: (see docs/scanner-setup.md for why and what the sender should set).
    tcp_quickack: bool = True
    #: DICOM over TLS: our certificate and its private key (PEM); both or neither.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: With TLS on: the CA (PEM) that must have signed every client's certificate.
    tls_ca: Path | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(_check_ae_title(a) for a in v)

    @field_validator("allowed_addresses")
    @classmethod
    def _addresses(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for text in v:
            try:
                out.append(str(ipaddress.ip_network(text.strip(), strict=False)))
            except ValueError:
                raise ValueError(
                    f"{text!r} is not an IP address or network (e.g. 10.0.0.5 or 10.0.0.0/24)"
                ) from None
        return tuple(out)

    @model_validator(mode="after")
    def _tls(self) -> ReceiverSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca (client certificates) needs tls_cert and tls_key")
        return self


class SelectorSettings(_Section):
    """Which series are analysed; every other series is spooled only."""

    #: Regular expression a SeriesDescription must match (search, case-insensitive).
    include_description: str = ".*"
    #: Regular expression that excludes a series when it matches.
    exclude_description: str = r"(?i)moco|phys(io)?log|_sbref\b"
    #: ImageType values (any position) that exclude an instance's series.
    exclude_image_types: tuple[str, ...] = ("MOCO", "P", "PHASE", "DERIVED")

    @field_validator("include_description", "exclude_description")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return v


class AssemblySettings(_Section):
    """How instances become volumes."""

    #: Which header gives a volume's temporal index for one-file-per-slice
    #: series. "auto": TemporalPositionIdentifier when NumberOfTemporalPositions
    #: > 1, else AcquisitionNumber for Siemens, else InstanceNumber arithmetic.
    temporal_key: Literal[
        "auto", "TemporalPositionIdentifier", "AcquisitionNumber", "InstanceNumber"
    ] = "auto"
    #: Force the number of slices per volume (0: from the headers).
    slices_per_volume: int = Field(default=0, ge=0)
    #: A volume still incomplete this many seconds after its first slice is
    #: reported missing and never waited for again.
    volume_timeout_s: float = Field(default=10.0, gt=0)
    #: With no slice count in the headers, a volume closes when a later volume
    #: has started and no slice of it arrived for this long.
    slice_grace_s: float = Field(default=1.0, gt=0)
    #: A series with no new instance for this long is closed.
    series_idle_timeout_s: float = Field(default=300.0, gt=0)


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: None: JSON when stderr is not a terminal.
    json_output: bool | None = Field(default=None, alias="json")


class Settings(_Section):
    """All of boldstream's settings; build with :func:`boldstream.config.load_settings`."""

    receiver: ReceiverSettings = ReceiverSettings()
    selector: SelectorSettings = SelectorSettings()
    assembly: AssemblySettings = AssemblySettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        return self
