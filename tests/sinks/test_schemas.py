"""sinks/schemas: one JSON Schema per topic, and real messages validate against it."""

from __future__ import annotations

import copy
import json
import time
from importlib import resources
from typing import Any

import jsonschema
import pytest
import zmq

from boldstream.sinks import topics

SCHEMAS = resources.files("boldstream.sinks").joinpath("schemas")


def schema(topic: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMAS.joinpath(f"{topic}.schema.json").read_text())
    return loaded


def test_every_topic_has_a_valid_schema() -> None:
    for topic in topics.DASHBOARD_TOPICS:
        jsonschema.Draft202012Validator.check_schema(schema(topic))


@pytest.fixture
def headers(zctx: zmq.Context[Any], publisher: Any) -> dict[str, list[dict[str, Any]]]:
    """Headers of a short simulated scan, received over tcp with the real codec."""
    sub = zctx.socket(zmq.SUB)
    sub.linger = 0
    for topic in topics.DASHBOARD_TOPICS:
        sub.subscribe(topic.encode())
    sub.connect(publisher.endpoint)
    publisher.wait_for_subscribers()
    publisher.start_series()
    publisher.scan(12, target_every=10)
    publisher.end_series(12)
    publisher.send(topics.warning_result(None, None, "spool 90% full", code="spool-full"))
    got: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 10.0
    while "series-end" not in got or "warning" not in got or len(got["warning"]) < 3:
        if time.monotonic() > deadline:
            pytest.fail(f"timed out; got {sorted(got)}")
        if sub.poll(100):
            frames = sub.recv_multipart()
            header = json.loads(frames[1])
            assert len(frames) == 2 + len(header["arrays"])
            got.setdefault(frames[0].decode(), []).append(header)
    return got


def test_published_messages_validate(headers: dict[str, list[dict[str, Any]]]) -> None:
    assert set(headers) == set(topics.DASHBOARD_TOPICS)
    for topic, items in headers.items():
        validator = jsonschema.Draft202012Validator(schema(topic))
        for header in items:
            validator.validate(header)


@pytest.mark.parametrize(
    ("topic", "path", "value"),
    [
        ("motion", ("body", "values", "trans_x"), None),
        ("qc", ("body", "values", "usable", "thresholds", 0, "fraction"), 1.5),
        ("target", ("body", "values", "status"), "final"),
        ("target", ("arrays", 0, "name"), "mask"),
        ("guidance", ("body", "values", "state"), "done"),
        ("guidance", ("body", "values", "minutes_more_range"), [1.0]),
        ("gap", ("body", "reason"), "lost"),
        ("volume-received", ("body", "values", "shape"), [64, 64]),
        ("series-start", ("v",), "2.0"),
    ],
)
def test_malformed_messages_do_not_validate(
    headers: dict[str, list[dict[str, Any]]], topic: str, path: tuple[Any, ...], value: Any
) -> None:
    bad = copy.deepcopy(headers[topic][0])
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema(topic))
