"""Named pause points for fault tests: widen the window between two steps of a task so
a kill -9 lands inside it. Off unless MIGCTL_FAULT_PAUSES names a point, e.g.
MIGCTL_FAULT_PAUSES="assign.after_claim=0.3,events.before_save=0.2" (seconds).
With MIGCTL_FAULT_MARKS=DIR, a file DIR/<point>.<pid> exists while a process is paused
there, so a test can kill it exactly then."""

from __future__ import annotations

import contextlib
import os
import time
from functools import cache


@cache
def _pauses() -> dict[str, float]:
    out: dict[str, float] = {}
    for item in os.environ.get("MIGCTL_FAULT_PAUSES", "").split(","):
        name, _, seconds = item.partition("=")
        if name.strip() and seconds.strip():
            out[name.strip()] = float(seconds)
    return out


def pause(point: str) -> None:
    seconds = _pauses().get(point)
    if not seconds:
        return
    marks = os.environ.get("MIGCTL_FAULT_MARKS", "")
    mark = os.path.join(marks, f"{point}.{os.getpid()}") if marks else ""
    if mark:
        with open(mark, "w"):
            pass
    try:
        time.sleep(seconds)
    finally:
        if mark:
            with contextlib.suppress(OSError):
                os.unlink(mark)
