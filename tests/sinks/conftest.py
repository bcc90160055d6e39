"""Fixtures for the sinks tests: a fake pipeline publisher and a live dashboard.

The fake publisher lives in ``fake_publisher.py`` beside this file (also a
development tool: run it as a script); it is loaded by path so that its name
cannot clash with the ``sinks`` package folder.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import zmq

from boldstream.sinks.dashboard import Dashboard


def _load_fake_publisher() -> ModuleType:
    name = "boldstream_tests_fake_publisher"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).with_name("fake_publisher.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


fake = _load_fake_publisher()


@pytest.fixture
def zctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def publisher(zctx: zmq.Context[Any]) -> Iterator[Any]:
    pub = fake.FakePublisher(context=zctx, missing={7}, late={9})
    yield pub
    pub.close()


@pytest.fixture
def make_dashboard() -> Iterator[Callable[..., Dashboard]]:
    made: list[Dashboard] = []

    def make(endpoint: str, **kwargs: Any) -> Dashboard:
        d = Dashboard(endpoint, **kwargs)
        d.start()
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where tests leave files for people to look at: $BOLDSTREAM_ARTIFACTS or tmp_path."""
    root = os.environ.get("BOLDSTREAM_ARTIFACTS")
    folder = Path(root) if root else tmp_path / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
