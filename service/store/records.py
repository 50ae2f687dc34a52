"""What the store keeps per account: the current token record and a shared failure marker."""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

from service.upstream import TokenGrant


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """The current tokens of one account. Times are wall-clock seconds.

    `version` orders records: a write never replaces a record with an equal or higher version.
    Versions are millisecond timestamps bumped past the version they replace, so they keep
    increasing even after Redis loses its data.

    `revoked` marks an access token a caller reported as rejected by Monogoto: no replica serves
    it again, and replacing it is a renewal every replica sees as due.

    `credentials` is the fingerprint (`credentials_fingerprint`) of the username and password
    whose login began this record's line: a login sets it, a refresh keeps it. None for records
    written before fingerprints existed (unknown).
    """

    version: int
    access_token: SecretStr
    refresh_token: SecretStr | None
    customer_id: str | None
    obtained_at: float
    expires_at: float
    refresh_expires_at: float | None = None
    revoked: bool = False
    credentials: str | None = None

    @property
    def lifetime(self) -> float:
        """The access token's whole lifetime in seconds."""
        return self.expires_at - self.obtained_at

    @property
    def usable_until(self) -> float:
        """Until when the access token may be served: its expiry, or 0 once it was revoked."""
        return 0.0 if self.revoked else self.expires_at

    @classmethod
    def from_grant(
        cls, grant: TokenGrant, *, replaces: int, now: float, credentials: str | None = None
    ) -> TokenRecord:
        """A record for a new grant that supersedes the record of version `replaces`, obtained
        with the credentials of fingerprint `credentials`."""
        return cls(
            version=max(replaces + 1, int(now * 1000)),
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
            customer_id=grant.customer_id,
            obtained_at=grant.requested_at,
            expires_at=grant.expires_at,
            refresh_expires_at=grant.refresh_expires_at,
            credentials=credentials,
        )

    def grant(self) -> TokenGrant:
        """This record as the grant the Monogoto client renews from."""
        refresh_lifetime = (
            None if self.refresh_expires_at is None else self.refresh_expires_at - self.obtained_at
        )
        return TokenGrant(
            access_token=self.access_token,
            refresh_token=self.refresh_token,
            customer_id=self.customer_id,
            requested_at=self.obtained_at,
            lifetime=self.lifetime,
            refresh_lifetime=refresh_lifetime,
        )

    def to_bytes(self) -> bytes:
        """Serialise, secrets included: only ever store the result encrypted."""
        return json.dumps(
            {
                "version": self.version,
                "access_token": self.access_token.get_secret_value(),
                "refresh_token": (
                    None if self.refresh_token is None else self.refresh_token.get_secret_value()
                ),
                "customer_id": self.customer_id,
                "obtained_at": self.obtained_at,
                "expires_at": self.expires_at,
                "refresh_expires_at": self.refresh_expires_at,
                "revoked": self.revoked,
                "credentials": self.credentials,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TokenRecord:
        """Inverse of `to_bytes`; ValueError if `data` is not such a record."""
        try:
            fields: dict[str, Any] = json.loads(data)
            refresh = fields["refresh_token"]
            refresh_until = fields["refresh_expires_at"]
            return cls(
                version=int(fields["version"]),
                access_token=SecretStr(str(fields["access_token"])),
                refresh_token=None if refresh is None else SecretStr(str(refresh)),
                customer_id=fields["customer_id"],
                obtained_at=float(fields["obtained_at"]),
                expires_at=float(fields["expires_at"]),
                refresh_expires_at=None if refresh_until is None else float(refresh_until),
                # Records written before revocation existed carry no such field.
                revoked=fields.get("revoked") is True,
                # Nor do records written before credentials were fingerprinted.
                credentials=_optional_str(fields.get("credentials")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a token record ({type(error).__name__})") from None


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """Monogoto rejected an account's credentials: no replica tries them again before
    `retry_at`. `credentials` is a keyed fingerprint of the username and password that were
    rejected (see `credentials_fingerprint`): a replica configured with other credentials is
    not held back. A marker without one (written by an older broker) holds back everyone."""

    detail: str
    retry_at: float
    credentials: str | None = None

    def applies_to(self, credentials: str) -> bool:
        """Whether this marker holds back a replica whose credentials have this fingerprint."""
        return self.credentials is None or hmac.compare_digest(self.credentials, credentials)

    def to_bytes(self) -> bytes:
        """Serialise (holds no secret: the credentials only as a keyed fingerprint)."""
        return json.dumps(
            {"detail": self.detail, "retry_at": self.retry_at, "credentials": self.credentials}
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> FailureRecord:
        """Inverse of `to_bytes`; ValueError if `data` is not such a record."""
        try:
            fields: dict[str, Any] = json.loads(data)
            credentials = fields.get("credentials")
            return cls(
                detail=str(fields["detail"]),
                retry_at=float(fields["retry_at"]),
                credentials=None if credentials is None else str(credentials),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a failure record ({type(error).__name__})") from None


def _optional_str(value: object) -> str | None:
    return None if value is None else str(value)


# Fixed, public key: the fingerprint only has to tell credentials apart without showing them,
# and the markers that carry it are themselves encrypted at rest in Redis.
_CREDENTIALS_KEY = b"monogoto-broker/rejected-credentials/v1"


def credentials_fingerprint(username: str, password: SecretStr) -> str:
    """A keyed fingerprint (HMAC-SHA256, 128 bits) of a username and password."""
    message = username.encode() + b"\0" + password.get_secret_value().encode()
    return hmac.new(_CREDENTIALS_KEY, message, hashlib.sha256).hexdigest()[:32]
