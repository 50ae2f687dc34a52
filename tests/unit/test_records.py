"""Token records and rejection markers: revocation and the credentials a marker applies to."""

from __future__ import annotations

import time
from dataclasses import replace

from pydantic import SecretStr

from service.broker.model import AccountStatus, CredentialsStatus
from service.broker.state import AccountState
from service.store import FailureRecord, TokenRecord, credentials_fingerprint

PASSWORD = SecretStr("pw-0451")


def record(version: int, *, revoked: bool = False, obtained_at: float | None = None) -> TokenRecord:
    """A record valid for a minute from `obtained_at` (now by default)."""
    start = time.time() if obtained_at is None else obtained_at
    return TokenRecord(
        version=version,
        access_token=SecretStr("eyJ.access"),
        refresh_token=SecretStr("eyJ.refresh"),
        customer_id=None,
        obtained_at=start,
        expires_at=start + 60,
        revoked=revoked,
    )


def test_a_revoked_record_survives_the_round_trip_and_is_never_usable() -> None:
    """Revocation is stored with the record; a revoked token is usable until 0."""
    revoked = record(2, revoked=True)
    assert TokenRecord.from_bytes(revoked.to_bytes()) == revoked
    assert revoked.usable_until == 0.0
    valid = record(1)
    assert valid.usable_until == valid.expires_at


def test_records_written_before_revocation_existed_read_as_not_revoked() -> None:
    """A record without the `revoked` field is a valid, unrevoked record."""
    data = record(1).to_bytes().replace(b',"revoked":false', b"")
    assert b"revoked" not in data
    assert TokenRecord.from_bytes(data).revoked is False


def test_a_marker_applies_to_the_credentials_it_was_written_for() -> None:
    """A marker holds back replicas with the rejected credentials, not those with others; a
    marker without a fingerprint (an older broker's) holds back everyone."""
    rejected = credentials_fingerprint("ops@example.com", SecretStr("wrong"))
    marker = FailureRecord(detail="rejected", retry_at=time.time() + 60, credentials=rejected)
    assert marker.applies_to(credentials_fingerprint("ops@example.com", SecretStr("wrong")))
    assert not marker.applies_to(credentials_fingerprint("ops@example.com", PASSWORD))
    assert not marker.applies_to(credentials_fingerprint("other@example.com", SecretStr("wrong")))
    legacy = FailureRecord(detail="rejected", retry_at=time.time() + 60)
    assert legacy.applies_to(credentials_fingerprint("ops@example.com", PASSWORD))
    assert FailureRecord.from_bytes(marker.to_bytes()) == marker


def test_the_fingerprint_does_not_show_the_password() -> None:
    """The fingerprint is a fixed-length digest without the password in it."""
    digest = credentials_fingerprint("ops@example.com", PASSWORD)
    assert len(digest) == 32
    assert PASSWORD.get_secret_value() not in digest


def test_a_grant_newer_than_the_rejection_ends_it() -> None:
    """A replica that learns of a grant obtained after it saw the rejection (by any replica)
    is no longer rejected; an older grant changes nothing."""
    state = AccountState()
    state.adopt("fleet-eu", record(1, obtained_at=time.time() - 30))
    state.rejected("fleet-eu", FailureRecord(detail="rejected", retry_at=time.time() + 300))
    assert state.status() is AccountStatus.CREDENTIALS_REJECTED
    state.adopt("fleet-eu", record(2, obtained_at=time.time() - 20))
    assert state.status() is AccountStatus.CREDENTIALS_REJECTED
    state.adopt("fleet-eu", record(3))
    assert state.status() is AccountStatus.OK
    assert state.rejected_until == 0.0


def test_a_record_keeps_the_fingerprint_of_the_credentials_that_obtained_it() -> None:
    """The fingerprint survives the round trip; a record from before fingerprints has none."""
    fingerprint = credentials_fingerprint("ops@example.com", PASSWORD)
    stamped = replace(record(3), credentials=fingerprint)
    assert TokenRecord.from_bytes(stamped.to_bytes()).credentials == fingerprint
    assert TokenRecord.from_bytes(record(3).to_bytes()).credentials is None


def test_a_grant_made_with_other_credentials_leaves_a_rejection_of_ours_standing() -> None:
    """A replica whose own credentials were rejected adopts a token another replica obtained
    with other credentials: it serves it, but its credentials stay rejected."""
    ours = credentials_fingerprint("ops@example.com", PASSWORD)
    theirs = credentials_fingerprint("ops@example.com", SecretStr("another"))
    state = AccountState(ours)
    marker = FailureRecord(detail="bad password", retry_at=time.time() + 300, credentials=ours)
    state.rejected("acct", marker)
    state.adopt("acct", replace(record(1), credentials=theirs))
    assert state.rejected_until > 0
    assert state.credentials_status() is CredentialsStatus.REJECTED
    assert state.status() is AccountStatus.CREDENTIALS_REJECTED
    assert state.token is not None
    assert state.token.usable(0.0)  # served all the same
    state.adopt("acct", replace(record(2), credentials=ours))
    assert state.rejected_until == 0
    assert state.credentials_status() is CredentialsStatus.VERIFIED
