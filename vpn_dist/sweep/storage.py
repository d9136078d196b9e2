"""Where a sweep keeps Ray Tune's state: the local file system, with every file Tune uploads written whole or not at
all. Tune copies its experiment state and each trial's result and error files into the storage path with plain
writes, so a disk that fills during a sweep used to leave them cut short, and the sweep could no longer resume; here
each file goes to a temporary name and is renamed once complete, so the previous version stays until the new one is
whole.
"""
from __future__ import annotations

import os
import tempfile


def atomic_local_filesystem():
    """A pyarrow file system (what Tune's `storage_filesystem` takes) over local paths, with atomic file writes."""
    import pyarrow
    from fsspec.implementations.local import LocalFileSystem
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    class AtomicWrites(FSSpecHandler):
        def open_output_stream(self, path, metadata):
            return pyarrow.PythonFile(_WholeOrNothing(path), mode="w")

    return PyFileSystem(AtomicWrites(LocalFileSystem()))


class _WholeOrNothing:
    """A binary file written under a temporary name in its directory and renamed to `path` on a clean close; a write
    that failed (a full disk) removes the temporary file instead, leaving any earlier version of `path` in place."""

    def __init__(self, path: str):
        self.path = path
        fd, self.tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.",
                                        suffix=".tmp")
        self.file = os.fdopen(fd, "wb")
        self.failed = False
        self.closed = False

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except BaseException:  # the caller may never close a stream whose write failed: clean up now
            self.failed = True
            self.close()
            raise

    def flush(self) -> None:
        self.file.flush()

    def tell(self) -> int:
        return self.file.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.file.close()  # the last buffered bytes: a full disk may refuse them here
        except OSError:
            if not self.failed:  # (after a failed write, that write's error is the one to report)
                self.failed = True
                raise
        finally:
            if self.failed:
                os.unlink(self.tmp)
            else:
                os.replace(self.tmp, self.path)
