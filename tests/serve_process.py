"""Run ``boldstream serve`` as a real process for end-to-end tests.

The process prints ``boldstream listening on HOST:PORT`` on stdout once
ready, then ``dashboard on URL`` (unless ``dashboard.enabled=false``), and
logs JSON lines on stderr (not a terminal); a reader thread collects them so
tests can wait for specific events with a bounded timeout. Every port is
ephemeral: the receiver's, the result and snapshot endpoints', the
dashboard's (``extra`` may override them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_LISTENING = re.compile(r"boldstream listening on (\S+):(\d+)")
_DASHBOARD = re.compile(r"dashboard on (http://\S+)")

#: Free ports only, so that tests run beside each other and beside a real serve.
EPHEMERAL = (
    "--set",
    "pipeline.pub=tcp://127.0.0.1:*",
    "--set",
    "pipeline.snapshot=tcp://127.0.0.1:*",
    "--set",
    "dashboard.port=0",
)


class ServeProcess:
    def __init__(
        self, spool: Path, *, extra: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> None:
        argv = [
            sys.executable,
            "-m",
            "boldstream",
            "serve",
            "--port",
            "0",
            "--spool",
            str(spool),
            *EPHEMERAL,
            *extra,
        ]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.logs: list[dict[str, Any]] = []
        self.raw_stderr: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = _LISTENING.search(line)
        if not match:
            self.kill()
            raise AssertionError(
                f"serve did not start: {line!r} {''.join(self.raw_stderr)[-2000:]}"
            )
        self.port = int(match.group(2))
        self.dashboard_url: str | None = None
        if "dashboard.enabled=false" not in extra:
            line = self.proc.stdout.readline()
            found = _DASHBOARD.search(line)
            if not found:
                self.kill()
                raise AssertionError(f"serve printed no dashboard line: {line!r}")
            self.dashboard_url = found.group(1)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.raw_stderr.append(line)
                with contextlib.suppress(json.JSONDecodeError):
                    self.logs.append(json.loads(line))
                self._cond.notify_all()

    def events(self, name: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.logs if e.get("event") == name]

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 30.0
    ) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.logs):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    return predicate(self.logs)
                self._cond.wait(min(remaining, 0.5))
            return True

    def terminate(self, timeout: float = 20.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
