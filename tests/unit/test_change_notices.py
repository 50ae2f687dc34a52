"""The messages on the change channel: a write's notice and an operator's reset notice."""

from __future__ import annotations

import pytest

from service.store.changes import _parse_notice, notice, reset_notice


def test_a_write_notice_carries_its_account_and_version() -> None:
    """Account names may hold spaces' neighbours (dashes, dots); the version is the last word."""
    change = _parse_notice(notice("fleet-eu.prod", 42).encode())
    assert change is not None
    assert (change.account, change.version, change.reset) == ("fleet-eu.prod", 42, False)


def test_a_reset_notice_is_told_apart_from_a_write() -> None:
    """A reset names the account and no version."""
    change = _parse_notice(reset_notice("fleet-eu").encode())
    assert change is not None
    assert (change.account, change.reset) == ("fleet-eu", True)


@pytest.mark.parametrize("data", [b"", b"fleet-eu", b" reset", b"fleet-eu -1", b"\xff 1", 7])
def test_anything_else_on_the_channel_is_ignored(data: object) -> None:
    """A message that is neither is dropped, not taken for a change."""
    assert _parse_notice(data) is None
