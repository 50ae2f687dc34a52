"""Caller authentication alone, in-process: a caller key against ServiceAccount tokens.

Serves an RS256 and an ES256 key as the issuer's JWKS on loopback, and times
`CallerDirectory.authenticate` for a key and for a token of each kind, the token's first call
(verification) apart from the later ones (the cache of verified tokens). See docs/performance.md.

    .venv/bin/python bench/auth.py [--calls 100000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.api.security import CallerDirectory  # noqa: E402
from service.config import build_settings  # noqa: E402
from service.keys import new_api_key  # noqa: E402
from tests.service_account_issuer import AUDIENCE, IssuerServer, SigningKey, claims, sign  # noqa: E402


async def per_call_us(directory: CallerDirectory, authorization: str, calls: int) -> float:
    """Mean microseconds per `authenticate` call over `calls` calls."""
    started = time.perf_counter()
    for _ in range(calls):
        await directory.authenticate(authorization)
    return (time.perf_counter() - started) / calls * 1e6


async def measure(calls: int) -> None:
    """Print the figures."""
    keys = [SigningKey.rsa("bench-rsa"), SigningKey.ec("bench-ec")]
    issuer = IssuerServer(keys).start()
    key, digest = new_api_key()
    settings = build_settings(
        {
            "redis_url": "memory://",
            "accounts": {"acct": {"username": "user", "password": "password"}},
            "callers": {
                "by-key": {"api_key_sha256": digest, "accounts": ["*"]},
                "by-token": {"service_accounts": ["bench/caller"], "accounts": ["*"]},
            },
            "caller_auth": {
                "kubernetes": {
                    "issuer": issuer.url,
                    "audiences": [AUDIENCE],
                    "jwks_url": issuer.jwks_url,
                }
            },
        }
    )
    directory = CallerDirectory(
        settings.callers, frozenset(settings.accounts), settings.caller_auth.kubernetes
    )
    if directory.service_accounts is None:
        raise RuntimeError("caller_auth.kubernetes is not configured")
    try:
        # One fetch of the keys now, so that the first call with a token times verification.
        await directory.service_accounts.keys.fetch_for("bench-rsa")
        print(f"caller key: {await per_call_us(directory, f'Bearer {key}', calls):6.1f} us/call")
        for signing_key in keys:
            token = sign(signing_key, claims(issuer.url, "bench", "caller"))
            header = f"Bearer {token}"
            first = await per_call_us(directory, header, 1)
            later = await per_call_us(directory, header, calls)
            print(
                f"{signing_key.algorithm} token ({len(token)} bytes): first call {first:6.0f} us, "
                f"later calls {later:6.1f} us/call"
            )
    finally:
        await directory.stop()
        issuer.stop()


def main() -> int:
    """Run the measurement."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000)
    asyncio.run(measure(parser.parse_args().calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
