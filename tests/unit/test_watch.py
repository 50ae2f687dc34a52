"""`service.watch.FileWatch`: files changed in place, by a Kubernetes volume's symlink swap,
or appearing."""

from __future__ import annotations

import os
from pathlib import Path

from service.watch import FileWatch
from tests.support import SecretVolume


def test_a_symlink_swap_is_a_change_even_with_the_same_size_and_time(tmp_path: Path) -> None:
    """A `..data` swap to a file of the same size and modification time is seen once."""
    volume = SecretVolume(tmp_path / "secret")
    volume.write({"password": "one"})
    stamp = volume.path("password").stat()
    watch = FileWatch([volume.path("password")])
    assert not watch.changed()
    volume.write({"password": "two"})
    os.utime(volume.path("password"), ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert watch.changed()
    assert not watch.changed()


def test_a_missing_file_is_a_state_unless_all_are_awaited(tmp_path: Path) -> None:
    """A file that appears is a change; with `wait_for_all`, nothing changes while one of the
    files is missing."""
    present, later = tmp_path / "present", tmp_path / "later"
    present.write_text("x")
    watch = FileWatch([present, later])
    waiting = FileWatch([present, later], wait_for_all=True)
    present.write_text("yy")
    assert watch.changed()
    assert not waiting.changed()
    later.write_text("z")
    assert watch.changed()
    assert waiting.changed()
