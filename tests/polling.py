"""Waiting on a background process (a sweep or grid driver) for something it writes, without a clock.

Import from a test module: `from polling import poll_until` (tests/ is on sys.path under pytest's default import mode).
"""
from __future__ import annotations

import subprocess
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def poll_until(found: Callable[[], T], proc: subprocess.Popen, every: float = 0.5) -> T:
    """What `found()` returns once it is truthy while `proc` runs, or its last answer once `proc` has ended.
    No deadline: the process's own end bounds the wait, so a slow machine is never a failure (a hung one is the
    test run's own time limit to catch)."""
    while proc.poll() is None:
        value = found()
        if value:
            return value
        time.sleep(every)  # the interval between looks; nothing depends on how long anything takes
    return found()
