"""What the store keeps per account: the current token record and a shared failure marker."""

from __future__ import annotations

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
    """

    version: int
    access_token: SecretStr
    refresh_token: SecretStr | None
    customer_id: str | None
    obtained_at: float
    expires_at: float
    refresh_expires_at: float | None = None

    @property
    def lifetime(self) -> float:
        """The access token's whole lifetime in seconds."""
        return self.expires_at - self.obtained_at

    @classmethod
    def from_grant(cls, grant: TokenGrant, *, replaces: int, now: float) -> TokenRecord:
        """A record for a new grant that supersedes the record of version `replaces`."""
        return cls(
            version=max(replaces + 1, int(now * 1000)),
            access_token=grant.access_token,
            refresh_token=grant.refresh_token,
            customer_id=grant.customer_id,
            obtained_at=grant.requested_at,
            expires_at=grant.expires_at,
            refresh_expires_at=grant.refresh_expires_at,
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
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a token record ({type(error).__name__})") from None


@dataclass(frozen=True, slots=True)
class FailureRecord:
    """Monogoto rejected an account's credentials: no replica tries again before `retry_at`."""

    detail: str
    retry_at: float

    def to_bytes(self) -> bytes:
        """Serialise (holds no secret)."""
        return json.dumps({"detail": self.detail, "retry_at": self.retry_at}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> FailureRecord:
        """Inverse of `to_bytes`; ValueError if `data` is not such a record."""
        try:
            fields: dict[str, Any] = json.loads(data)
            return cls(detail=str(fields["detail"]), retry_at=float(fields["retry_at"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a failure record ({type(error).__name__})") from None
