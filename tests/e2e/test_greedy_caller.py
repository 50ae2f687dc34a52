"""A greedy (or buggy) caller forces renewals in a loop beside a polite caller of another
account: it costs one upstream call a minute at most, and the polite caller never notices."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from service.keys import new_api_key
from service.simulator.client import SimulatorControl
from tests.e2e.harness import (
    ReliabilityRow,
    UpstreamCounts,
    account,
    broker_config,
    write_config,
)

if TYPE_CHECKING:
    from tests.e2e.conftest import Record, StartBrokers

LIFETIME_SECONDS = 600
RUN_SECONDS = 20.0
# A caller forces at most one renewal per account and this interval (docs/api.md).
FORCED_INTERVAL_SECONDS = 60.0
# Monogoto's own limit, which is also the broker's default budget: 5 auth calls a minute.
AUTH_RATE = {"limit": 5, "period_seconds": 60}
GREEDY, POLITE = "greedy-a", "polite-b"
ACCOUNTS = {GREEDY: account(5, "v1"), POLITE: account(6, "v1")}
GREEDY_LOOPS = 4
POLITE_LOOPS = 4
PAUSE_SECONDS = 0.02


@dataclass
class Seen:
    """What one caller saw: answers by (request kind, status, code), Retry-After values of its
    refused requests, the details of its 400s and the tokens it was served."""

    answers: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    retry_after: list[int] = field(default_factory=list)
    missing_retry_after: int = 0
    #: The problem details of the answers that were not 200, by status and code.
    details: dict[str, set[str]] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def record(self, kind: str, response: httpx.Response) -> str | None:
        """Count `response` to a `kind` request; the access token it served, if any."""
        if response.status_code == 200:
            self.answers[kind, 200, "-"] += 1
            token: str = response.json()["access_token"]
            if token not in self.tokens:
                self.tokens.append(token)
            return token
        body = response.json()
        self.answers[kind, response.status_code, body.get("code", "-")] += 1
        code = f"{response.status_code} {body.get('code', '-')}"
        self.details.setdefault(code, set()).add(body.get("detail", ""))
        if "Retry-After" in response.headers:
            self.retry_after.append(int(response.headers["Retry-After"]))
        elif response.status_code != 400:
            self.missing_retry_after += 1
        return None

    def statuses(self, kind: str) -> Counter[str]:
        """Answers to `kind` requests by status and code, e.g. `429 renewal_rate_limited`."""
        seen: Counter[str] = Counter()
        for (asked, status, code), count in self.answers.items():
            if asked == kind:
                seen[str(status) if code == "-" else f"{status} {code}"] += count
        return seen

    def summary(self) -> str:
        """Answers by request kind, status and code, with the details of 503s."""
        answers = ", ".join(
            f"{count} x {kind} {status}{'' if code == '-' else ' ' + code}"
            for (kind, status, code), count in sorted(self.answers.items())
        )
        failures = sorted(
            detail
            for code, details in self.details.items()
            if code.startswith("503")
            for detail in details
        )
        return answers + "".join(f' ("{detail}")' for detail in failures)


async def test_a_greedy_caller_costs_one_call_a_minute_and_never_fails_another_caller(
    tmp_path: Path,
    redis_url: str,
    e2e_simulator: SimulatorControl,
    start_brokers: StartBrokers,
    reliability: Record,
) -> None:
    """A caller looping `min_ttl=<lifetime - 1>`, `min_ttl=<lifetime>` and invalidates of
    each new token it gets, over three replicas for 20 s on Monogoto's real budget (5 calls a
    minute), costs at most one upstream call; its refused requests are 429
    renewal_rate_limited with Retry-After. Beside it, a caller of another account is served
    every time, and its one legitimate invalidate gets a new token."""
    e2e_simulator.set(
        token_lifetime_seconds=LIFETIME_SECONDS,
        rate_limit=AUTH_RATE["limit"],
        rate_period_seconds=AUTH_RATE["period_seconds"],
    )
    greedy_key, greedy_digest = new_api_key()
    polite_key, polite_digest = new_api_key()
    config = broker_config(
        redis_url,
        e2e_simulator.base_url,
        greedy_digest,
        ACCOUNTS,
        upstream={"auth_rate": AUTH_RATE},
    )
    config["callers"] = {
        "greedy": {"api_key_sha256": greedy_digest, "accounts": [GREEDY]},
        "polite": {"api_key_sha256": polite_digest, "accounts": [POLITE]},
    }
    replicas = [r.url for r in start_brokers(write_config(tmp_path / "broker.yaml", config), 3)]
    greedy, polite = Seen(), Seen()
    refused = asyncio.Event()  # the greedy caller has been refused: it spent its renewal
    reported: dict[str, str] = {}  # the polite caller's invalidate: old and new token

    async def greedy_loop(client: httpx.AsyncClient, start: int, deadline: float) -> None:
        turns = itertools.cycle(replicas[start:] + replicas[:start])
        invalidated: set[str] = set()
        base = f"/v1/accounts/{GREEDY}/token"
        while time.monotonic() < deadline:
            response = await client.get(
                f"{next(turns)}{base}", params={"min_ttl": LIFETIME_SECONDS - 1}
            )
            greedy.record("get min_ttl=lifetime-1", response)
            response = await client.get(
                f"{next(turns)}{base}", params={"min_ttl": LIFETIME_SECONDS}
            )
            greedy.record("get min_ttl=lifetime", response)
            # Invalidate every token it has not reported yet, whoever got it.
            for token in [t for t in greedy.tokens if t not in invalidated]:
                invalidated.add(token)
                response = await client.post(
                    f"{next(turns)}{base}/invalidate", json={"access_token": token}
                )
                greedy.record("invalidate", response)
            if any(status == 429 for _, status, _ in greedy.answers):
                refused.set()
            await asyncio.sleep(PAUSE_SECONDS)

    async def polite_loop(client: httpx.AsyncClient, start: int, deadline: float) -> None:
        turns = itertools.cycle(replicas[start:] + replicas[:start])
        base = f"/v1/accounts/{POLITE}/token"
        while time.monotonic() < deadline:
            served = polite.record("get", await client.get(f"{next(turns)}{base}"))
            if start == 0 and not reported and refused.is_set() and served is not None:
                # Monogoto rejected the token this caller holds (say): it reports it, once.
                reported["old"] = served
                response = await client.post(
                    f"{next(turns)}{base}/invalidate", json={"access_token": served}
                )
                reported["new"] = polite.record("invalidate", response) or ""
            await asyncio.sleep(PAUSE_SECONDS)

    started = time.monotonic()
    deadline = started + RUN_SECONDS
    greedy_headers = {"Authorization": f"Bearer {greedy_key}"}
    polite_headers = {"Authorization": f"Bearer {polite_key}"}
    async with (
        httpx.AsyncClient(timeout=30, headers=greedy_headers) as greedy_client,
        httpx.AsyncClient(timeout=30, headers=polite_headers) as polite_client,
    ):
        await asyncio.gather(
            *(greedy_loop(greedy_client, i % 3, deadline) for i in range(GREEDY_LOOPS)),
            *(polite_loop(polite_client, i % 3, deadline) for i in range(POLITE_LOOPS)),
        )
    elapsed = time.monotonic() - started

    greedy_upstream = UpstreamCounts.read(e2e_simulator, ACCOUNTS[GREEDY]["username"])
    polite_upstream = UpstreamCounts.read(e2e_simulator, ACCOUNTS[POLITE]["username"])
    total = UpstreamCounts.read(e2e_simulator)
    # Besides the first login, which the replicas make at start, whatever account A costs
    # is the greedy caller's doing (its token is nowhere near its refresh point).
    caused = greedy_upstream.calls - 1
    allowed = int(elapsed // FORCED_INTERVAL_SECONDS) + 1
    reliability(
        ReliabilityRow(
            scenario="greedy caller",
            injected=(
                f"caller looping min_ttl={LIFETIME_SECONDS - 1}, min_ttl={LIFETIME_SECONDS} "
                f"(the lifetime) and invalidates of each new token for {RUN_SECONDS:.0f} s over "
                f"3 replicas, beside a caller of another account that invalidates once; "
                f"budget {AUTH_RATE['limit']} per {AUTH_RATE['period_seconds']} s"
            ),
            callers_saw=(
                f"greedy: {greedy.summary()}; polite: {polite.summary()}; "
                f"Retry-After of 429s {min(greedy.retry_after, default=0)}-"
                f"{max(greedy.retry_after, default=0)} s"
            ),
            upstream_calls=(
                f"{total.describe()}; caused by the greedy caller {caused} in {elapsed:.0f} s "
                f"(at most {allowed}); polite account {polite_upstream.describe()}"
            ),
            rate_limited=total.rate_limited,
            reused=total.reused,
        )
    )
    # The greedy caller: one forced renewal at most, then 429 with Retry-After.
    assert caused <= allowed, f"the greedy caller caused {caused} upstream calls"
    refusals = {
        code
        for kind in ("get min_ttl=lifetime-1", "invalidate")
        for code in greedy.statuses(kind)
        if code != "200"
    }
    assert refusals == {"429 renewal_rate_limited"}, greedy.summary()
    assert greedy.missing_retry_after == 0
    assert all(1 <= seconds <= FORCED_INTERVAL_SECONDS for seconds in greedy.retry_after)
    assert greedy.statuses("get min_ttl=lifetime") == Counter(
        {"400 invalid_request": greedy.statuses("get min_ttl=lifetime").total()}
    )
    too_long = greedy.details.get("400 invalid_request", set())
    assert too_long, "no min_ttl=<lifetime> request was made"
    assert all(f"({LIFETIME_SECONDS} s)" in detail for detail in too_long)
    # The polite caller: every GET served, its invalidate answered with a new token.
    assert reported, "the polite caller never reported its token"
    assert polite.statuses("get").keys() == {"200"}, polite.summary()
    assert polite.statuses("invalidate") == Counter({"200": 1}), polite.details
    assert reported["new"] != reported["old"]
    assert polite_upstream.calls == 2, "one login, then one renewal for the invalidate"
    assert total.rate_limited == 0
    assert total.reused == 0
