"""Where audit lines go: standard output, or a file that is reopened when rotated away."""

from __future__ import annotations

import errno
import os
from logging.handlers import WatchedFileHandler
from pathlib import Path
from typing import Protocol

# The most a write() to a pipe may carry and still arrive in one piece when several processes
# (`serve --workers N`) share it; an O_APPEND file keeps any single write() whole anyway.
ATOMIC_WRITE_BYTES = 4096
_STDOUT = 1


class Sink(Protocol):
    """A destination for whole lines: each `write` is one write() call."""

    @property
    def name(self) -> str:
        """Where the lines go, for readiness and logs."""
        ...

    def write(self, data: bytes) -> None:
        """Write `data` in one write() call; OSError if it cannot be written."""
        ...

    def reopen(self) -> None:
        """Make sure the destination can be written again; OSError if not."""
        ...

    def close(self) -> None:
        """Release the destination."""
        ...


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    # A regular file or pipe takes the whole buffer at once; a short count (disk full, a
    # signal) is finished rather than lost.
    while view:
        written = os.write(fd, view)
        view = view[written:]


class StdoutSink:
    """The process's standard output (descriptor 1), shared by every worker of `serve`."""

    name = "standard output"

    def write(self, data: bytes) -> None:
        """Write `data` to standard output."""
        _write(_STDOUT, data)

    def reopen(self) -> None:
        """Standard output cannot be reopened; OSError if it is closed."""
        os.fstat(_STDOUT)

    def close(self) -> None:
        """Standard output stays open for the rest of the process."""


class FileSink:
    """A file appended to, reopened when it was renamed or deleted (log rotation).

    The standard library's WatchedFileHandler decides when to reopen (the path no longer names
    the file it holds open). Lines go straight to its descriptor, not through the handler's
    buffered stream, so each batch is one write() on an O_APPEND descriptor: lines of several
    processes appending to the same file never interleave.
    """

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self._path = path
        self._file: WatchedFileHandler | None = None

    def _descriptor(self) -> int:
        try:
            if self._file is None:
                self._file = WatchedFileHandler(self._path, encoding="utf-8")
            else:
                self._file.reopenIfNeeded()
            stream = self._file.stream
            if stream is None:  # the handler was closed: cannot happen while it is ours
                raise OSError(errno.EBADF, "not open")
            return stream.fileno()
        except OSError:
            # A reopen that failed halfway leaves the handler without a stream: start afresh.
            self.close()
            raise

    def write(self, data: bytes) -> None:
        """Append `data` to the file the path names now."""
        descriptor = self._descriptor()
        try:
            _write(descriptor, data)
        except OSError:
            self.close()
            raise

    def reopen(self) -> None:
        """Open the file the path names now (creating it); OSError if that fails."""
        self._descriptor()

    def close(self) -> None:
        """Close the file; the next write opens it again."""
        if self._file is not None:
            file, self._file = self._file, None
            file.close()
