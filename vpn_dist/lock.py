"""One process at a time in an output directory (a run directory, a prepared data set, a sweep's or a grid's OUT).

`hold_directory` takes an exclusive flock on OUT/.vpn-dist.lock (an empty file) for the command's life. The kernel
drops a flock when the process holding it ends, however it ends (an exception, Ctrl-C, SIGKILL, the OOM killer), so a
killed run never leaves its directory locked: the file stays behind, and without the lock it means nothing. Under Ray
the driver process holds it (its workers write into a directory their driver owns); in a Tune trial, the trial's
process.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

from vpn_dist.errors import UserError, os_error_text
from vpn_dist.observe import make_output_dir

LOCK_FILE = ".vpn-dist.lock"


@contextlib.contextmanager
def hold_directory(path: str | Path, what: str = "run directory"):
    """Create `path` if needed and own it until the block ends; a UserError naming the holder when another process
    owns it. A directory this call created is removed again when the block fails before writing anything into it
    (a refusal leaves the disk as it was)."""
    path = Path(path)
    created = not path.exists()
    make_output_dir(path, what)
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        _remove_if_empty(path, created)
        raise UserError(f"{what} {path} cannot be locked: {os_error_text(err)}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{what} {path} is in use by {_holder(fd)}; wait for that command to end, or give "
                            f"another directory") from None
        except OSError as err:  # a file system without locks (some network mounts): go on, and say so
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"note: {what} {path} cannot be locked ({err.strerror}): make sure no other vpn-dist command "
                  f"writes into it at the same time", flush=True)
        yield path
    except BaseException:
        _remove_if_empty(path, created)
        raise
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    """'process PID' holding the flock on fd's file, from the kernel's table of locks (Linux); nothing is written
    into the lock file, so taking the lock, or being refused it, changes nothing on disk."""
    info = os.fstat(fd)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device:
                    return f"process {fields[4]} (another vpn-dist command)"
    except OSError:
        pass
    return "another process"


def _remove_if_empty(path: Path, created: bool) -> None:
    """Remove a directory this process created when it holds nothing but the lock file."""
    if not created:
        return
    try:
        if {p.name for p in path.iterdir()} <= {LOCK_FILE}:
            (path / LOCK_FILE).unlink(missing_ok=True)
            path.rmdir()
    except OSError:
        pass
