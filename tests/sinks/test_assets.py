"""The page's files: everything ships in the package, nothing loads from elsewhere."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

from boldstream.sinks.dashboard import app

STATIC = resources.files("boldstream.sinks.dashboard").joinpath("static")


def read(name: str) -> bytes:
    node = STATIC
    for part in name.split("/"):
        node = node.joinpath(part)
    return node.read_bytes()


def test_every_served_file_exists() -> None:
    for name, _ in app._STATIC.values():
        assert read(name), name


def test_vendored_files_match_the_hashes_on_record() -> None:
    readme = read("vendor/README.md").decode()
    recorded = dict(
        (name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M)
    )
    assert set(recorded) == {"uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"}
    for name, digest in recorded.items():
        assert hashlib.sha256(read(f"vendor/{name}")).hexdigest() == digest, name
    assert b"MIT License" in read("vendor/uPlot.LICENSE")


def test_our_files_reference_nothing_outside_the_origin() -> None:
    for name in ("index.html", "app.js", "style.css"):
        text = read(name).decode()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text, name
    html = read("index.html").decode()
    for src in re.findall(r'(?:src|href)="([^"]+)"', html):
        assert src.startswith("/static/") or src == "data:,", src
    # No inline script or style: the Content-Security-Policy forbids them.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert "<style" not in html and " style=" not in html


def test_the_page_shows_no_patient_fields() -> None:
    text = (read("index.html") + read("app.js")).decode().lower()
    for field in ("patientname", "patient_name", "patientid", "birth", "series_uid", "study_uid"):
        assert field not in text
