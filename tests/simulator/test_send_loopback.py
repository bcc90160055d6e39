"""The sender against a small pynetdicom Storage SCP on 127.0.0.1 (ephemeral port)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from boldstream.simulator.encode import SeriesSpec
from boldstream.simulator.phantom import PhantomRun, SimulatorError, make_phantom_run
from boldstream.simulator.send import SendOptions, send_run

MR = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"


@dataclass
class Received:
    instances: list[tuple[int, int, str]] = field(default_factory=list)
    calling: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def scp() -> Iterator[tuple[int, Received]]:
    received = Received()

    def on_store(event: Any) -> int:
        ds = event.dataset
        with received.lock:
            received.instances.append(
                (int(ds.AcquisitionNumber), int(ds.InstanceNumber), str(ds.SOPInstanceUID))
            )
            received.calling.add(event.assoc.requestor.ae_title)
        return 0x0000

    ae = AE(ae_title="BOLDSTREAM")
    ae.require_called_aet = True
    for sop in (MR, ENHANCED_MR):
        ae.add_supported_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def run() -> PhantomRun:
    return make_phantom_run(n_volumes=4, tr_s=1.0, shape=(16, 16, 6), voxel_mm=4.0, seed=3)


def test_per_slice_over_two_associations(scp: tuple[int, Received], run: PhantomRun) -> None:
    port, received = scp
    options = SendOptions(encoding="slice", associations=2, calling_aet="SIMSCANNER", timeout_s=10)
    report = send_run(run, "127.0.0.1", port, options)
    assert report.instances == 4 * 6 and report.statuses == {0: 24} and report.failed == 0
    assert sorted(i for _, i, _ in received.instances) == list(range(1, 25))
    assert received.calling == {"SIMSCANNER"}


def test_drop_duplicate_and_shuffle(scp: tuple[int, Received], run: PhantomRun) -> None:
    port, received = scp
    spec = SeriesSpec(tr_s=run.tr_s, n_volumes=run.n_volumes)
    options = SendOptions(
        encoding="slice",
        shuffle=True,
        duplicate_fraction=1.0,
        drop=frozenset({(2, 3)}),
        spec=spec,
        seed=1,
        timeout_s=10,
    )
    report = send_run(run, "127.0.0.1", port, options)
    assert report.series_uid == spec.series_uid
    assert report.instances == 2 * 23 == len(received.instances)
    numbers = [i for _, i, _ in received.instances]
    assert 2 * 6 + 3 + 1 not in numbers  # volume 2, slice 3 never sent
    assert all(numbers.count(n) == 2 for n in set(numbers))
    first_volume = [i for acq, i, _ in received.instances if acq == 1][:6]
    assert first_volume != sorted(first_volume)


@pytest.mark.parametrize("encoding", ["mosaic", "enhanced", "enhanced-series"])
def test_volume_encodings(scp: tuple[int, Received], run: PhantomRun, encoding: str) -> None:
    port, received = scp
    report = send_run(run, "127.0.0.1", port, SendOptions(encoding=encoding, pace=50.0))  # type: ignore[arg-type]
    expected = 1 if encoding == "enhanced-series" else 4
    assert report.statuses == {0: expected} and len(received.instances) == expected


def test_refused_association_is_a_clear_error(scp: tuple[int, Received], run: PhantomRun) -> None:
    port, _ = scp
    with pytest.raises(SimulatorError, match="cannot associate"):
        send_run(run, "127.0.0.1", port, SendOptions(called_aet="NOT_US", timeout_s=10))


@dataclass
class Timed:
    """When each volume began to be built and when the SCP answered each volume."""

    built: dict[int, float] = field(default_factory=dict)
    answered: dict[int, float] = field(default_factory=dict)


def _timed_send(
    run: PhantomRun, monkeypatch: pytest.MonkeyPatch, delay_s: dict[int, float], pace: float
) -> Timed:
    """Send ``run`` as mosaics to an SCP that takes ``delay_s[t]`` to answer volume t."""
    import boldstream.simulator.send as send

    timed = Timed()
    encode = send.encode_volume

    def recording_encode(volume: Any, vox2ras: Any, spec: Any, t: int, **kw: Any) -> Any:
        timed.built[t] = time.monotonic()
        return encode(volume, vox2ras, spec, t, **kw)

    monkeypatch.setattr(send, "encode_volume", recording_encode)

    def on_store(event: Any) -> int:
        t = int(event.dataset.AcquisitionNumber) - 1
        time.sleep(delay_s.get(t, 0.0))
        timed.answered[t] = time.monotonic()  # the response leaves after this
        return 0x0000

    ae = AE(ae_title="BOLDSTREAM")
    ae.add_supported_context(MR, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        report = send_run(
            run, "127.0.0.1", server.server_address[1], SendOptions(encoding="mosaic", pace=pace)
        )
    finally:
        server.shutdown()
    assert report.statuses == {0: run.n_volumes}
    return timed


def test_paced_builds_the_next_volume_once_the_last_is_answered(
    run: PhantomRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A volume every 0.25 s, each answered after 50 ms: the simulator must not
    # build volume t+1 (on the receiver's cores) while volume t is being handled.
    timed = _timed_send(run, monkeypatch, {t: 0.05 for t in range(4)}, pace=4.0)
    for t in range(1, 4):
        assert timed.built[t] >= timed.answered[t - 1], t


def test_paced_does_not_wait_for_an_answer_past_the_next_volume(
    run: PhantomRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Volume 0 takes 0.8 s to answer, four periods of 0.2 s: volume 1 is still
    # built on schedule rather than after that answer.
    timed = _timed_send(run, monkeypatch, {0: 0.8}, pace=5.0)
    assert timed.built[1] < timed.answered[0] - 0.4
    assert timed.built[1] - timed.built[0] < 0.4
