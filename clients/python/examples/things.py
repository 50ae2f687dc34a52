"""things.py: list the fleet's things from Monogoto, with tokens from the broker.

A complete caller: it survives token rotation (the client caches each token until its margin,
then asks the broker again), a revoked token (Monogoto answers 401: the auth reports it and
retries once with the replacement) and a broker restart (a refused connection or a 503 is
asked again within `max_wait`; a cached token keeps working meanwhile).

    MONOGOTO_BROKER_URL=http://monogoto-broker.broker:8080 BROKER_KEY_FILE=/path/key \\
        python things.py
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from monogoto_broker_client import BrokerError, MonogotoAuth, TokenSource

source = TokenSource(
    os.environ["MONOGOTO_BROKER_URL"],
    os.environ.get("MONOGOTO_ACCOUNT", "fleet-eu"),
    api_key_file=os.environ.get("BROKER_KEY_FILE", "/var/run/secrets/broker/key"),
    margin=60,
    max_wait=20,
)
monogoto = httpx.Client(
    base_url=os.environ.get("MONOGOTO_API_URL", "https://api.monogoto.io"),
    auth=MonogotoAuth(source),
    timeout=15,
)


def things() -> list[dict[str, Any]]:
    """The fleet's things; raises BrokerError when no token can be had within 20 s."""
    response = monogoto.get("/v1/things")
    response.raise_for_status()  # a 401 here means even a fresh token was refused
    found: list[dict[str, Any]] = response.json()["things"]
    return found


if __name__ == "__main__":
    try:
        for thing in things():
            print(thing["thing_id"], thing["state"])
    except BrokerError as error:  # safe to print: no token or key in it
        raise SystemExit(f"no Monogoto token: {error}") from None
