"""The ``boldstream`` entry point itself (each command has tests of its own)."""

from __future__ import annotations

import argparse

import numpy  # noqa: F401  (loads OpenBLAS: threadpoolctl then has a BLAS to report)
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from boldstream import cli


def _blas_threads() -> set[int]:
    return {int(pool["num_threads"]) for pool in threadpool_info() if pool["user_api"] == "blas"}


def test_commands_run_with_one_blas_thread_and_the_limit_is_lifted_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[set[int]] = []

    def probe_parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="boldstream")
        sub = parser.add_subparsers(dest="command", required=True)
        probe = sub.add_parser("probe")
        probe.set_defaults(func=lambda _args: seen.append(_blas_threads()) or 0)
        return parser

    monkeypatch.setattr(cli, "build_parser", probe_parser)
    with threadpool_limits(limits=2, user_api="blas"):
        if not _blas_threads():
            pytest.skip("numpy reports no BLAS that threadpoolctl can limit")
        assert cli.main(["probe"]) == 0
        assert seen == [{1}]
        assert _blas_threads() == {2}  # the process's own setting is back
