"""Noticing that files changed, the way a Kubernetes volume changes them.

A Secret or ConfigMap volume updates by writing a new directory and pointing the `..data`
symlink at it: every file then is another inode, even where its size and times are the same.
So files are compared by the stat of their targets (symlinks followed), which is a few system
calls per file and reads nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

# What identifies one version of a file: device, inode, modification time and size.
Stamp = tuple[int, int, int, int]


def stamp(path: Path) -> Stamp | None:
    """The stamp of the file `path` names (through symlinks); None if there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino, found.st_mtime_ns, found.st_size)


class FileWatch:
    """Tells whether any of some files changed since it last looked.

    A file that cannot be found counts as a state of its own (a config naming a file that does
    not exist yet is noticed when the file appears), unless `wait_for_all`: then nothing has
    changed until every file is there again (a pair swapped by hand, one file after the other,
    is looked at again next time instead of half-way).
    """

    def __init__(self, paths: Iterable[Path], *, wait_for_all: bool = False) -> None:
        self.paths = tuple(dict.fromkeys(paths))
        self._wait_for_all = wait_for_all
        self._seen = self._look()

    def _look(self) -> tuple[Stamp | None, ...]:
        return tuple(stamp(path) for path in self.paths)

    def changed(self) -> bool:
        """Whether the files changed since the last call (or since the watch began)."""
        now = self._look()
        if now == self._seen or (self._wait_for_all and None in now):
            return False
        self._seen = now
        return True
