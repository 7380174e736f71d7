"""Helpers for tests: the CI rule for missing services, and waiting with a deadline."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, what: str) -> None:
    """Skip locally when a service is missing; fail in CI, where it must be there."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI (CI=true) but is missing")
    pytest.skip(f"{what} is not available")


def wait_until(predicate: Callable[[], Any], what: str, timeout: float, every: float = 0.1) -> Any:
    """The predicate's first true value; a deadline against hangs, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout:.0f}s: {what}")
        time.sleep(every)
