"""Running stages: a thread over inproc://, a process over ipc:// or tcp://, a chain.

- :class:`StageThread` runs a stage in a thread sharing the caller's
  :class:`zmq.Context` (``inproc://`` needs one context): tests, single process.
- :class:`StageProcess` runs it in its own process, started with ``spawn`` or
  ``forkserver`` (a forked copy of a process with ZeroMQ threads is unsafe),
  over ``ipc://`` or ``tcp://127.0.0.1``. The child gets only the picklable
  :class:`~boldstream.stream.stage.StageConfig` and reports the endpoints it
  bound (ephemeral ports included) through a pipe before it starts looping.
- :func:`start_chain` wires stages into a PUSH/PULL chain, last stage first.

Both runners answer ``health()`` and ``stop()`` through the stage's control
socket, with bounded timeouts; a process that does not stop is terminated.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import zmq

from boldstream.errors import StreamError
from boldstream.logs import configure_logging
from boldstream.stream.stage import StageConfig, run_stage

__all__ = [
    "Chain",
    "StageControl",
    "StageProcess",
    "StageThread",
    "start_chain",
]


# --------------------------------------------------------------------------- control client


class StageControl:
    """Client of a stage's control socket (one per caller thread: sockets are not shared)."""

    def __init__(self, context: zmq.Context[Any], address: str) -> None:
        self.address = address
        self._context = context
        self._socket: zmq.Socket[Any] = self._connect()

    def _connect(self) -> zmq.Socket[Any]:
        socket: zmq.Socket[Any] = self._context.socket(zmq.DEALER)
        socket.linger = 0
        socket.connect(self.address)
        return socket

    def request(self, command: str, *, timeout: float = 2.0) -> dict[str, Any]:
        """Send ``command`` ("health" or "stop"); the JSON reply, or StreamError on timeout."""
        self._socket.send_multipart([b"", command.encode()])
        if not self._socket.poll(int(timeout * 1000)):
            # A late reply must not be mistaken for the next one: start afresh.
            self._socket.close(linger=0)
            self._socket = self._connect()
            raise StreamError(f"no reply to {command!r} from {self.address} within {timeout} s")
        reply: dict[str, Any] = json.loads(self._socket.recv_multipart()[-1])
        return reply

    def close(self) -> None:
        self._socket.close(linger=0)


# --------------------------------------------------------------------------- runners


class _Runner:
    config: StageConfig
    endpoints: dict[str, str]
    _control: StageControl | None

    def health(self, *, timeout: float = 2.0) -> dict[str, Any]:
        """The stage's counters, last volume, lag and state (see ``_Loop.health``)."""
        return self._client().request("health", timeout=timeout)

    def _client(self) -> StageControl:
        if self._control is None:
            raise StreamError(f"stage {self.config.name!r} is not started")
        return self._control

    def _ask_stop(self, timeout: float) -> None:
        if self._control is None:
            return
        # Already gone, or stuck: the caller's join/terminate decides.
        with contextlib.suppress(StreamError):
            self._control.request("stop", timeout=min(timeout, 2.0))

    def _close_client(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None


class StageThread(_Runner):
    """Run a stage in a thread of this process, sharing ``context`` (inproc://)."""

    def __init__(self, config: StageConfig, *, context: zmq.Context[Any]) -> None:
        tag = f"{config.name}-{uuid.uuid4().hex[:8]}"
        self.config = replace(
            config,
            pull=config.pull or f"inproc://{tag}-in",
            control=config.control or f"inproc://{tag}-control",
        )
        self.context = context
        self.endpoints = {}
        self._control = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"stage-{config.name}", daemon=True)

    def _main(self) -> None:
        def ready(endpoints: dict[str, str]) -> None:
            self.endpoints = endpoints
            self._ready.set()

        try:
            run_stage(self.config, self.context, on_ready=ready)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            if not isinstance(exc, StreamError):
                raise

    def start(self, *, timeout: float = 10.0) -> dict[str, str]:
        """Start the thread; return the bound endpoints once the sockets exist."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise StreamError(f"stage {self.config.name!r} did not start within {timeout} s")
        if self._error is not None:
            raise StreamError(f"stage {self.config.name!r} failed to start: {self._error}")
        self._control = StageControl(self.context, self.endpoints["control"])
        return self.endpoints

    def stop(self, *, timeout: float = 5.0) -> None:
        """Ask the stage to stop and wait for it; StreamError if it does not."""
        if self._thread.is_alive():
            self._ask_stop(timeout)
            self._thread.join(timeout)
        self._close_client()
        if self._thread.is_alive():
            raise StreamError(f"stage {self.config.name!r} did not stop within {timeout} s")

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the stage to end by itself (end of stream); True if it did."""
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close_client()
        return not self._thread.is_alive()

    def is_alive(self) -> bool:
        return self._thread.is_alive()


def _process_main(config: StageConfig, conn: multiprocessing.connection.Connection) -> None:
    """Entry point of a stage process: a fresh context, logging, the loop."""
    configure_logging()
    context: zmq.Context[Any] = zmq.Context()
    try:
        run_stage(config, context, on_ready=conn.send)
    except StreamError as exc:
        conn.send({"error": str(exc)})
    finally:
        conn.close()
        context.term()


class StageProcess(_Runner):
    """Run a stage in its own process over ipc:// or tcp://127.0.0.1.

    ``start_method`` is "spawn" (default) or "forkserver": a forked copy of a
    process that owns ZeroMQ sockets or threads is not safe.
    """

    def __init__(
        self,
        config: StageConfig,
        *,
        context: zmq.Context[Any] | None = None,
        start_method: Literal["spawn", "forkserver"] = "spawn",
    ) -> None:
        for address in (config.pull, config.control, config.pub):
            if address is not None and address.startswith("inproc://"):
                raise StreamError(
                    f"stage {config.name!r}: {address} cannot cross a process boundary; "
                    "use ipc:// or tcp://127.0.0.1"
                )
        self.config = replace(
            config,
            pull=config.pull or "tcp://127.0.0.1:*",
            control=config.control or "tcp://127.0.0.1:*",
        )
        self.context = context or zmq.Context.instance()
        self.endpoints = {}
        self._control = None
        mp: Any = multiprocessing.get_context(start_method)
        self._conn, child = mp.Pipe(duplex=False)
        self._process = mp.Process(
            target=_process_main,
            args=(self.config, child),
            name=f"stage-{config.name}",
            daemon=True,
        )
        self._child_conn = child

    @property
    def pid(self) -> int | None:
        pid: int | None = self._process.pid
        return pid

    def start(self, *, timeout: float = 30.0) -> dict[str, str]:
        """Start the process; return its bound endpoints once it reports them."""
        self._process.start()
        self._child_conn.close()
        if not self._conn.poll(timeout):
            self._kill()
            raise StreamError(f"stage {self.config.name!r} did not start within {timeout} s")
        try:
            report: dict[str, str] = self._conn.recv()
        except EOFError:
            self._process.join(1.0)
            raise StreamError(
                f"stage {self.config.name!r} exited during start "
                f"(exit code {self._process.exitcode})"
            ) from None
        if "error" in report:
            self._process.join(5.0)
            raise StreamError(f"stage {self.config.name!r} failed to start: {report['error']}")
        self.endpoints = report
        self._control = StageControl(self.context, report["control"])
        return report

    def stop(self, *, timeout: float = 5.0) -> None:
        """Ask the stage to stop; terminate it if it has not ended within ``timeout``."""
        if self._process.is_alive():
            self._ask_stop(timeout)
            self._process.join(timeout)
        self._close_client()
        if self._process.is_alive():
            self._kill()
            raise StreamError(f"stage {self.config.name!r} did not stop within {timeout} s")
        self._conn.close()

    def _kill(self) -> None:
        self._process.terminate()
        self._process.join(2.0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(2.0)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the stage to end by itself (end of stream); True if it did."""
        self._process.join(timeout)
        if not self._process.is_alive():
            self._close_client()
        return not self._process.is_alive()

    def is_alive(self) -> bool:
        return bool(self._process.is_alive())

    @property
    def exitcode(self) -> int | None:
        code: int | None = self._process.exitcode
        return code


# --------------------------------------------------------------------------- chains

Runner = StageThread | StageProcess


@dataclass(slots=True)
class Chain:
    """Stages started back to front; ``input`` is where the source connects."""

    stages: list[Runner]
    input: str

    def health(self, *, timeout: float = 2.0) -> list[dict[str, Any]]:
        return [s.health(timeout=timeout) for s in self.stages]

    def stop(self, *, timeout: float = 5.0) -> None:
        """Stop every stage, front to back; raise the first failure after trying all."""
        failure: StreamError | None = None
        for s in self.stages:
            try:
                s.stop(timeout=timeout)
            except StreamError as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def join(self, timeout: float) -> bool:
        """Wait until every stage has ended by itself (after an EndOfStream)."""
        end = time.monotonic() + timeout
        return all(s.join(max(0.0, end - time.monotonic())) for s in self.stages)


def start_chain(
    configs: Sequence[StageConfig],
    *,
    output: str | None,
    mode: Literal["thread", "process"],
    context: zmq.Context[Any] | None = None,
    start_method: Literal["spawn", "forkserver"] = "spawn",
    timeout: float = 30.0,
) -> Chain:
    """Start ``configs`` as a PUSH/PULL chain ending at ``output`` (connected).

    Each stage's ``push`` is set to the next stage's bound ``pull`` endpoint, so
    stages start from the last one back (an ephemeral TCP port is only known
    once bound). On a start failure, the stages already running are stopped.
    """
    if mode == "thread" and context is None:
        raise StreamError("start_chain(mode='thread') needs the shared context")
    started: list[Runner] = []
    downstream = output
    try:
        for config in reversed(configs):
            config = replace(config, push=downstream)
            runner: Runner
            if mode == "thread":
                assert context is not None
                runner = StageThread(config, context=context)
            else:
                runner = StageProcess(config, context=context, start_method=start_method)
            started.append(runner)
            downstream = runner.start(timeout=timeout)["pull"]
    except BaseException:
        for runner in started:
            with contextlib.suppress(StreamError):
                runner.stop(timeout=2.0)
        raise
    started.reverse()
    assert downstream is not None
    return Chain(stages=started, input=downstream)
