"""The exception types the CLI turns into one line (and an exit code), and the words for a failed file operation."""
from __future__ import annotations

import errno
import shutil
import signal
from pathlib import Path


class UserError(Exception):
    """A problem with what the user gave us (a file, a config value, a flag), not a bug."""


class TrainingFailed(Exception):
    """A run that started but could not finish (a diverged loss, workers that kept failing)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM. A KeyboardInterrupt, so `except Exception` never swallows it and every `finally` on the way
    out runs (temporary files are removed); the CLI prints the message and exits 128 + the signal's number."""

    def __init__(self, message: str = "interrupted (Ctrl-C)", signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


def free_space(path: str | Path) -> int | None:
    """Bytes free to this user on the file system holding `path` (or its nearest existing parent)."""
    path = Path(path)
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def os_error_text(err: OSError) -> str:
    """`<cause>: <file>` plus what the cause asks of the operator, for an OSError from reading or writing a file."""
    cause = (err.strerror or str(err) or type(err).__name__).rstrip(".")
    cause = cause[0].lower() + cause[1:] if cause else cause
    text = f"{cause}: {err.filename}" if err.filename else cause
    if err.errno in (errno.ENOSPC, errno.EDQUOT):  # (how much is free now says little: partial files are gone)
        text += "; free space on that file system or write elsewhere"
    elif err.errno == errno.EROFS:
        text += "; that file system is mounted read-only: write elsewhere or remount it read-write"
    elif err.errno in (errno.EACCES, errno.EPERM):
        text += "; this user may not write there: fix its permissions or write elsewhere"
    return text
