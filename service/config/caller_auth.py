"""`caller_auth`: callers proving who they are by other means than a key.

`caller_auth.kubernetes` lets a caller present its projected ServiceAccount token instead: the
broker checks it against the cluster's service-account issuer and its published keys (JWKS).
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Annotated, Any, Self
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, ModelWrapValidatorHandler, model_validator

from service.config.fields import Problems, check_fields, read_file
from service.config.models import _Section

DISCOVERY_PATH = "/.well-known/openid-configuration"
_FETCH_URL = "must be an https:// URL (http:// only for a loopback address such as 127.0.0.1)"


def is_loopback(host: str | None) -> bool:
    """Whether `host` (a URL's hostname) names this machine: `localhost` or a loopback IP."""
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_fetch_url(url: str) -> str:
    """`url` if the broker may fetch keys from it: https, or http to a loopback address only
    (keys fetched in the clear could be swapped on the way); else ValueError."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = None
    if parts is None or not parts.hostname:
        raise ValueError(_FETCH_URL)
    if parts.scheme == "https" or (parts.scheme == "http" and is_loopback(parts.hostname)):
        if parts.fragment:
            raise ValueError("must not have a fragment")
        # It is shown in logs and readiness details; a credential goes in jwks_token_file.
        if parts.username is not None or parts.password is not None:
            raise ValueError("must not hold a user or password (use jwks_token_file)")
        return url
    raise ValueError(_FETCH_URL)


def _check_audience(audience: str) -> str:
    if not audience.strip():
        raise ValueError("must not be empty")
    return audience


FetchUrl = Annotated[str, AfterValidator(check_fetch_url)]
Audience = Annotated[str, AfterValidator(_check_audience)]


class KubernetesAuthSettings(_Section):
    """The cluster whose ServiceAccount tokens are accepted from callers."""

    # Compared with the token's `iss` exactly, as the API server's `--service-account-issuer`.
    issuer: str = Field(min_length=1)
    audiences: list[Audience] = Field(min_length=1)
    jwks_url: FetchUrl | None = None
    jwks_ca_file: Path | None = None
    jwks_token_file: Path | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _check_sources(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        return check_fields(
            cls,
            data,
            handler,
            {
                ("issuer", "jwks_url"): cls._discovery,
                ("jwks_ca_file",): cls._ca_file,
                ("jwks_token_file",): cls._token_file,
            },
        )

    def _discovery(self) -> Problems:
        if self.jwks_url is not None or "issuer" not in self.model_fields_set:
            return []
        try:
            check_fetch_url(self.issuer)
        except ValueError as error:
            return [
                (
                    ("issuer",),
                    f"without jwks_url, the keys are found through the issuer's discovery "
                    f"document, so the issuer {error}",
                )
            ]
        return []

    def _ca_file(self) -> Problems:
        if self.jwks_ca_file is None:
            return []
        try:
            ca_context(read_file(self.jwks_ca_file), self.jwks_ca_file)
        except ValueError as error:
            return [(("jwks_ca_file",), str(error))]
        return []

    def _token_file(self) -> Problems:
        if self.jwks_token_file is None:
            return []
        try:
            read_file(self.jwks_token_file)
        except ValueError as error:
            return [(("jwks_token_file",), str(error))]
        return []

    @property
    def discovery_url(self) -> str:
        """Where the issuer publishes its OpenID discovery document (which names the JWKS)."""
        return self.issuer.rstrip("/") + DISCOVERY_PATH


def ca_context(text: str, path: Path) -> ssl.SSLContext:
    """A TLS context trusting the PEM certificates in `text`, read from `path`; ValueError if
    there are none."""
    try:
        return ssl.create_default_context(cadata=text)
    except ssl.SSLError:
        raise ValueError(f"{path} holds no PEM certificate") from None


class CallerAuthSettings(_Section):
    """Ways for callers to authenticate besides their key."""

    kubernetes: KubernetesAuthSettings | None = None
