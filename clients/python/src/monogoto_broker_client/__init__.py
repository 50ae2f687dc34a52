"""Client of the Monogoto token broker.

`TokenSource` hands out the access tokens of one account, cached until shortly before they
expire, with one request to the broker however many threads or tasks ask at once.
`MonogotoAuth` (httpx) and `MonogotoRequestsAuth` (requests) put them on requests to Monogoto
and, when Monogoto answers 401, report the token and retry once with its replacement.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from monogoto_broker_client._auth import MonogotoAuth, MonogotoRequestsAuth
from monogoto_broker_client._errors import BrokerError, BrokerRefusedError, BrokerUnavailableError
from monogoto_broker_client._source import TokenSource

try:
    __version__ = version("monogoto-broker-client")
except PackageNotFoundError:  # the sources on sys.path without being installed
    __version__ = "0+unknown"

__all__ = [
    "BrokerError",
    "BrokerRefusedError",
    "BrokerUnavailableError",
    "MonogotoAuth",
    "MonogotoRequestsAuth",
    "TokenSource",
    "__version__",
]
