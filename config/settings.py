"""The typed, validated settings of boldstream.

One frozen object is built at start from, in increasing precedence: the
defaults below, a TOML file, ``BOLDSTREAM_<SECTION>__<KEY>`` environment
variables, and command-line overrides. Unknown keys are errors, and every
error names the key (``receiver.port: ...``).
"""

from __future__ import annotations

import ipaddress
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "AssemblySettings",
    "ConnectivitySettings",
    "DashboardSettings",
    "GuidanceSettings",
    "LoggingSettings",
    "MotionSettings",
    "OutputsSettings",
    "PacsSettings",
    "PipelineSettings",
    "QCSettings",
    "ReceiverSettings",
    "SelectorSettings",
    "Settings",
    "TargetSettings",
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
    #: Free space (MB) the spool's disk keeps: an instance that would leave
    #: less is refused (0xA700) and the technician told, before the disk is so
    #: full that logs and outputs fail too. 0: refuse only when the disk is full.
    min_free_mb: float = Field(default=200.0, ge=0)
    #: Seconds a socket may stay silent before the association is aborted.
    network_timeout_s: float = Field(default=60.0, gt=0)
    #: Set TCP_NODELAY and re-arm TCP_QUICKACK on accepted sockets
    #: (see docs/scanner-setup.md for why and what the sender should set).
    tcp_quickack: bool = True
    #: How long pynetdicom's per-association network loop sleeps when idle (ms),
    #: from the association request on. Lower answers faster (more instances/s,
    #: quicker set-up) at a little idle CPU per association.
    reactor_poll_ms: float = Field(default=0.2, gt=0, le=10)
    #: Answer plain C-STOREs on pynetdicom's network thread, from the PDU bytes,
    #: instead of through its state machine, DIMSE objects and association
    #: thread (receiver/direct.py; 1.1-1.3x the instance rate, see
    #: docs/benchmarks.md). Everything else still goes through pynetdicom; off
    #: sends every message that way.
    direct_store: bool = True
    #: Where decoding and volume assembly run: "process", a child process with an
    #: interpreter of its own, restarted if it dies (the receiver process keeps
    #: the network and the durable write); or "thread", inside the receiver
    #: process (one process less; slower with a busy scanner).
    ingest: Literal["process", "thread"] = "process"
    #: When an instance may become part of a volume: "on_arrival", as soon as
    #: it is decoded, while its durable write runs (a mosaic's volume about
    #: 1.2 ms sooner here, see docs/benchmarks.md; an instance whose write then
    #: fails is already in its volume: logged, and the technician is told); or
    #: "after_write", once that write has succeeded (no volume is ever built
    #: from an instance the scanner was refused).
    assemble: Literal["after_write", "on_arrival"] = "on_arrival"
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
    exclude_description: str = r"(?i)moco|phys(io)?log"
    #: Regular expression of single-band reference (SBRef) series: assembled
    #: and used as the motion reference of the next BOLD series on the same
    #: grid (SPEC 2), never analysed themselves. Empty: none.
    reference_description: str = r"(?i)_sbref\b"
    #: ImageType values (any position) that exclude an instance's series.
    exclude_image_types: tuple[str, ...] = ("MOCO", "P", "PHASE", "DERIVED")

    @field_validator("include_description", "exclude_description", "reference_description")
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


class MotionSettings(_Section):
    """Incremental rigid motion correction (SPEC section 2)."""

    #: Volumes at the start of a series left out of the analysis (steady
    #: state not reached); the reference is the first volume after them.
    dummy_scans: int = Field(default=0, ge=0)
    #: Pyramid levels of the Gauss-Newton registration (1: full resolution only).
    levels: int = Field(default=2, ge=1, le=4)
    #: Gauss-Newton iterations allowed per pyramid level.
    max_iter: int = Field(default=15, ge=1, le=200)
    #: Convergence: an update that moves points by less than this (mm RMS).
    tol_mm: float = Field(default=0.002, gt=0)
    #: Interpolation of the corrected volume: 1 trilinear (fast), 3 cubic B-spline.
    reslice_order: Literal[1, 3] = 1


class QCSettings(_Section):
    """Live quality metrics (SPEC section 3)."""

    #: Framewise-displacement thresholds (mm) that usable data is counted at.
    fd_thresholds_mm: tuple[float, ...] = (0.2, 0.3, 0.5)
    #: Good minutes wanted; the predicted scan time still needed aims at it.
    goal_minutes: float = Field(default=12.5, gt=0)
    #: A frame is an outlier above this FD (mm) ...
    fd_outlier_mm: float = Field(default=0.5, gt=0)
    #: ... or above this std_DVARS.
    std_dvars_outlier: float = Field(default=1.5, gt=0)
    #: Frames before std_DVARS is first estimated, and the most frames kept
    #: for its denominator's spread: evenly spaced over the whole run so far
    #: (analysis/qc.py).
    std_dvars_warmup: int = Field(default=20, ge=3)
    std_dvars_window: int = Field(default=120, ge=3)
    #: Repetition time (s) used when a series does not state one.
    default_tr_s: float = Field(default=2.0, gt=0)

    @field_validator("fd_thresholds_mm")
    @classmethod
    def _thresholds(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not t > 0 for t in v):
            raise ValueError("give at least one threshold, each above 0 mm")
        return tuple(sorted(v))

    @model_validator(mode="after")
    def _window(self) -> QCSettings:
        if self.std_dvars_window < self.std_dvars_warmup:
            raise ValueError("std_dvars_window must be at least std_dvars_warmup")
        return self


class ConnectivitySettings(_Section):
    """Running sgACC seed connectivity (SPEC section 4)."""

    #: Run the connectivity stage after QC (registration, seed map, target).
    enabled: bool = True
    #: Corrected volumes averaged into the mean EPI registered to MNI152.
    registration_volumes: int = Field(default=10, ge=3, le=200)
    #: Frames with FD above this (mm) are censored from the regression.
    fd_censor_mm: float = Field(default=0.5, gt=0)
    #: Motion regressors: "6" parameters, "12" with differences, "24" with squares too.
    motion_model: Literal["6", "12", "24"] = "12"
    #: Band-pass the search region's map at each target recompute.
    bandpass: bool = True
    bandpass_low_hz: float = Field(default=0.01, gt=0)
    bandpass_high_hz: float = Field(default=0.1, gt=0)
    #: Minutes of search-region data kept for the band-passed recompute.
    buffer_minutes: float = Field(default=30.0, gt=0, le=240)
    #: Seed sphere radius at MNI (6, 16, -10) and search-sphere radius (mm).
    seed_radius_mm: float = Field(default=10.0, gt=0, le=30)
    search_radius_mm: float = Field(default=20.0, gt=0, le=40)

    @model_validator(mode="after")
    def _band(self) -> ConnectivitySettings:
        if self.bandpass_high_hz <= self.bandpass_low_hz:
            raise ValueError("bandpass_high_hz must be above bandpass_low_hz")
        return self


class TargetSettings(_Section):
    """The provisional TMS target and when it is called stable (SPEC section 5)."""

    #: "centroid" (Cash et al. 2021) or "peak" (most negative voxel; unstable).
    method: Literal["centroid", "peak"] = "centroid"
    #: Seconds of data between target recomputes (SPEC: every 30-60 s).
    every_s: float = Field(default=30.0, gt=0)
    #: Smoothing of the map inside the search region (mm FWHM; 4-6 published).
    fwhm_mm: float = Field(default=5.0, ge=0, le=20)
    #: Centroid rule: voxels at or below this percentile of the negative r values.
    percentile: float = Field(default=10.0, gt=0, lt=100)
    #: Stable needs this much good data (SPEC 5: individual beats group after 10 min) ...
    stable_good_minutes: float = Field(default=8.0, ge=0)
    #: ... first/second-half targets this close (centroid methods: 2-7 mm) ...
    stable_split_half_mm: float = Field(default=7.0, gt=0)
    #: ... and at most this movement over the last minute (unverified).
    stable_drift_mm: float = Field(default=3.0, gt=0)
    #: ... and its strongest anticorrelation beyond chance at this p against
    #: phase-randomised seeds (our choice, tuned on simulated null runs) ...
    stable_p: float = Field(default=0.01, gt=0, lt=1)
    #: ... with the p, split-half and drift limits held for this long.
    stable_hold_s: float = Field(default=60.0, ge=0)
    #: Settling: this much good data, split-half distance and p (unverified).
    settling_good_minutes: float = Field(default=5.0, ge=0)
    settling_split_half_mm: float = Field(default=15.0, gt=0)
    settling_p: float = Field(default=0.05, gt=0, lt=1)
    #: Phase-randomised seeds per recompute for the p (p resolution 1/(n+1)).
    null_surrogates: int = Field(default=200, ge=19, le=5000)

    @model_validator(mode="after")
    def _p_reachable(self) -> TargetSettings:
        # With n surrogates the smallest p is 1 / (n + 1): a limit below it
        # would keep every target from that status forever.
        for key in ("stable_p", "settling_p"):
            limit = getattr(self, key)
            if 1.0 / (self.null_surrogates + 1) > limit:
                need = math.ceil(1.0 / limit - 1.0 - 1e-9)
                raise ValueError(
                    f"null_surrogates = {self.null_surrogates} cannot give p <= {limit:g} "
                    f"({key}): the smallest p is 1/(n+1); use at least {need}"
                )
        return self

    def rules(self) -> dict[str, float]:
        """The keyword arguments of ``analysis.target.TargetRules``."""
        return {
            "stable_good_minutes": self.stable_good_minutes,
            "stable_split_half_mm": self.stable_split_half_mm,
            "stable_drift_mm": self.stable_drift_mm,
            "stable_p": self.stable_p,
            "stable_hold_s": self.stable_hold_s,
            "settling_good_minutes": self.settling_good_minutes,
            "settling_split_half_mm": self.settling_split_half_mm,
            "settling_p": self.settling_p,
        }


class GuidanceSettings(_Section):
    """Scan guidance: enough data for a settled target yet? (docs/guidance.md).

    What "settled" means comes from ``[target]`` (stable_*); these say when
    and how the advice is made.
    """

    #: Publish ``guidance`` results (needs ``[connectivity] enabled``).
    enabled: bool = True
    #: The FD threshold (mm) whose good minutes the advice quotes (one of
    #: ``[qc] fd_thresholds_mm``, else the nearest).
    fd_threshold_mm: float = Field(default=0.5, gt=0)
    #: Volumes between updates (and at every target and at the series' end).
    every_volumes: int = Field(default=5, ge=1)
    #: Split-half distances and good minutes needed before any prediction.
    min_points: int = Field(default=4, ge=2)
    min_fit_minutes: float = Field(default=3.0, ge=0)
    #: Good minutes before a flat split-half trend is called not settling.
    verdict_good_minutes: float = Field(default=8.0, ge=0)
    #: Further scan minutes beyond which settling is not expected in this run.
    horizon_minutes: float = Field(default=20.0, gt=0)
    #: Growth of the split-half distance (mm) above its best that is un-settling.
    rebound_mm: float = Field(default=5.0, gt=0)
    #: Resampled fits behind the range, and the central interval reported (%).
    resamples: int = Field(default=200, ge=20, le=5000)
    band: float = Field(default=90.0, gt=0, lt=100)


class PipelineSettings(_Section):
    """The real-time pipeline: stages, result stream and supervision."""

    #: "process": each analysis stage in its own process over ipc:// (restarted
    #: if it dies); "thread": threads over inproc:// (tests, small machines).
    mode: Literal["process", "thread"] = "process"
    #: Where subscribers (the dashboard) connect for results: a ZeroMQ XPUB
    #: bind address; "tcp://127.0.0.1:*" picks a free port.
    pub: str = "tcp://127.0.0.1:11120"
    #: Snapshot endpoint (REP-style ROUTER) for late joiners; "" disables it.
    snapshot: str = "tcp://127.0.0.1:11121"
    #: Folder for the stage processes' ipc:// sockets; unset: a fresh folder
    #: under the system temporary directory (ipc paths must stay short).
    ipc_dir: Path | None = None
    #: Per-series checkpoints of the stages' state, under the spool folder
    #: unless set; written every ``checkpoint_every`` volumes (process mode).
    checkpoint_dir: Path | None = None
    checkpoint_every: int = Field(default=10, ge=1)
    #: A volume that has not arrived this long after a later one is declared
    #: missing (a gap); more than ``max_pending`` held volumes force it too.
    order_timeout_s: float = Field(default=5.0, gt=0)
    order_max_pending: int = Field(default=64, ge=1)
    #: A series with no new volume for this long is ended (flushes its gaps).
    series_idle_s: float = Field(default=120.0, gt=0)
    #: Restarts allowed per stage process before the pipeline gives up on it.
    max_restarts: int = Field(default=5, ge=0)
    #: BLAS threads per stage process (OPENBLAS/OMP/MKL_NUM_THREADS when not set).
    blas_threads: int = Field(default=1, ge=1)
    #: Messages queued per hop before the sender waits (back-pressure).
    hwm: int = Field(default=32, ge=1)
    #: CurveZMQ for ``pub`` and ``snapshot``: the server's secret key file
    #: (``NAME.key_secret`` from ``boldstream keys``); unset: no encryption.
    curve_secret_key: Path | None = None
    #: Folder of client public keys (``*.key``) allowed to subscribe; unset:
    #: any client that knows the server's public key.
    curve_authorized_keys: Path | None = None

    @model_validator(mode="after")
    def _curve(self) -> PipelineSettings:
        if self.curve_authorized_keys is not None and self.curve_secret_key is None:
            raise ValueError("curve_authorized_keys needs curve_secret_key")
        return self

    @field_validator("pub", "snapshot")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if v and not re.match(r"^(tcp|ipc|inproc)://\S+$", v):
            raise ValueError("a ZeroMQ address like tcp://127.0.0.1:11120 or ipc:///run/bs.sock")
        return v


class DashboardSettings(_Section):
    """The technician's live dashboard that ``serve`` starts (docs/dashboard.md)."""

    enabled: bool = True
    #: Address the page is served on; the console's LAN address to show it on
    #: another screen (any address but loopback needs ``token_file``).
    host: str = "127.0.0.1"
    #: HTTP port; 0 picks a free port (tests).
    port: int = Field(default=8080, ge=0, le=65535)
    #: Host names pages may use besides IP literals, localhost and this
    #: machine's own names (a DNS alias of the console).
    allowed_hosts: tuple[str, ...] = ()
    #: File holding the secret token every request but /healthz must carry
    #: (16+ URL-safe characters); required when ``host`` is not loopback.
    token_file: Path | None = None


class OutputsSettings(_Section):
    """The BIDS-derivatives files ``serve`` writes while the scan runs (docs/results.md)."""

    #: Derivatives folder; unset: ``derivatives`` beside the spool folder.
    dir: Path | None = None
    #: BIDS subject label (letters and digits); empty: from the pseudonymous
    #: session key of each series, never from a patient identifier.
    subject: str = ""
    #: BIDS task label of the files.
    task: str = "rest"
    #: Also write the target for neuronavigation (Brainsight, Localite).
    exports: bool = True

    @field_validator("subject", "task")
    @classmethod
    def _label(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9]*", v):
            raise ValueError("a BIDS label has letters and digits only")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        if not v:
            raise ValueError("the task label cannot be empty")
        return v


class PacsSettings(_Section):
    """Sending the connectivity map and target back to PACS (docs/results.md)."""

    #: The PACS' address; empty: nothing is sent.
    host: str = ""
    port: int = Field(default=104, ge=1, le=65535)
    #: The PACS' AE title (required with ``host``).
    called_ae: str = ""
    #: Our AE title when sending.
    calling_ae: str = "BOLDSTREAM"
    #: Bound on connecting, association and each C-STORE reply (s).
    timeout_s: float = Field(default=30.0, gt=0)
    #: Once per series: the last target at its end ("series-end"), or the
    #: first target whose status is stable ("stable").
    when: Literal["series-end", "stable"] = "series-end"

    @field_validator("calling_ae")
    @classmethod
    def _calling(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("called_ae")
    @classmethod
    def _called(cls, v: str) -> str:
        return _check_ae_title(v) if v else v

    @model_validator(mode="after")
    def _peer(self) -> PacsSettings:
        if self.host and not self.called_ae:
            raise ValueError("called_ae (the PACS' AE title) is needed with host")
        return self


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
    motion: MotionSettings = MotionSettings()
    qc: QCSettings = QCSettings()
    connectivity: ConnectivitySettings = ConnectivitySettings()
    target: TargetSettings = TargetSettings()
    guidance: GuidanceSettings = GuidanceSettings()
    pipeline: PipelineSettings = PipelineSettings()
    dashboard: DashboardSettings = DashboardSettings()
    outputs: OutputsSettings = OutputsSettings()
    pacs: PacsSettings = PacsSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        return self
