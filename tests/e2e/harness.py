"""Building blocks of the end-to-end scenarios: broker configs, a load of concurrent callers
behind a rotation of replicas, the simulator's counts and scraped broker metrics.

Every scenario records one row of the reliability table (`docs/reliability.md`) through the
`reliability` fixture; the rows are printed together at the end of the run.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.claims import read_claims
from service.keys import new_api_key, new_encryption_key
from service.simulator.client import SimulatorControl
from tests.support import eventually

#: Users of the e2e simulator: one per account a scenario needs, so its calls are counted apart.
USERS = {f"user{index:02d}@monogoto.example": f"password-{index:02d}" for index in range(32)}
USERNAMES = list(USERS)

#: Simulator endpoints that a login or a refresh of either dialect goes to.
AUTH_ENDPOINTS = ("legacy_auth", "v1_token", "v1_refresh")


def account(index: int, dialect: str = "v1", *, password: str | None = None) -> dict[str, str]:
    """The config of an account logging in as simulator user `index`."""
    username = USERNAMES[index]
    return {
        "username": username,
        "password": USERS[username] if password is None else password,
        "dialect": dialect,
    }


def broker_config(
    redis_url: str,
    simulator_url: str,
    key_digest: str,
    accounts: Mapping[str, Mapping[str, str]],
    **sections: Mapping[str, Any],
) -> dict[str, Any]:
    """A broker config: the given accounts, one caller allowed all of them, and `sections`
    (`upstream`, `refresh`, ...) merged over quick test defaults."""
    config: dict[str, Any] = {
        "redis_url": redis_url,
        "encryption_keys": new_encryption_key(),
        "upstream": {
            "base_url": simulator_url,
            "timeout_seconds": 5,
            "auth_rate": {"limit": 5, "period_seconds": 60},
        },
        "refresh": {"fraction": 0.5, "min_remaining_seconds": 1},
        "accounts": {name: dict(settings) for name, settings in accounts.items()},
        "callers": {"e2e": {"api_key_sha256": key_digest, "accounts": ["*"]}},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def limited_config(
    simulator: SimulatorControl,
    redis_url: str,
    accounts: Mapping[str, Mapping[str, str]],
    limit: int,
    period_seconds: float,
    *,
    lifetime: float | None = None,
    upstream: Mapping[str, Any] | None = None,
    refresh: Mapping[str, Any] | None = None,
) -> tuple[str, dict[str, Any]]:
    """Monogoto (the simulator) limited to `limit` auth calls per `period_seconds`, issuing
    tokens of `lifetime` seconds if given, and a `broker_config` for a new caller key whose
    auth budget is that same limit, with the `upstream` and `refresh` settings given: the
    caller key and the config."""
    settings = {"rate_limit": limit, "rate_period_seconds": period_seconds}
    if lifetime is not None:
        settings["token_lifetime_seconds"] = lifetime
    simulator.set(**settings)
    key, digest = new_api_key()
    auth_rate = {"limit": limit, "period_seconds": period_seconds}
    config = broker_config(
        redis_url,
        simulator.base_url,
        digest,
        accounts,
        upstream={"auth_rate": auth_rate, **(upstream or {})},
        refresh=refresh or {},
    )
    return key, config


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write `config` as YAML to `path`; returns `path`."""
    path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
    return path


@dataclass
class Rotation:
    """The replicas callers may reach, as a load balancer would route them: a replica leaves
    the rotation before it is stopped and joins once it is ready."""

    urls: list[str] = field(default_factory=list)

    def pick(self) -> str:
        """A replica at random."""
        return random.choice(self.urls)  # noqa: S311 - load spreading, not security


@dataclass
class LoadReport:
    """What the callers of a load saw."""

    #: Answers per (account, status, problem code or "-").
    answers: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    #: Distinct access tokens served per account.
    tokens: dict[str, set[str]] = field(default_factory=dict)
    #: Every Retry-After value seen on a 503.
    retry_after: list[int] = field(default_factory=list)
    #: Tokens served that were expired or had less than a second left, and transport errors.
    problems: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        """Requests answered in all."""
        return sum(self.answers.values())

    def served(self, account: str | None = None) -> int:
        """Tokens served (200), for one account or all."""
        return sum(
            count
            for (name, status, _), count in self.answers.items()
            if status == 200 and account in (None, name)
        )

    def failed(self) -> int:
        """Requests not answered 200 (problems included)."""
        return self.requests - self.served() + len(self.problems)

    def codes(self) -> Counter[str]:
        """Answers by status and problem code, e.g. `200`, `503 upstream_unavailable`."""
        seen: Counter[str] = Counter()
        for (_, status, code), count in self.answers.items():
            seen[str(status) if code == "-" else f"{status} {code}"] += count
        return seen

    def summary(self) -> str:
        """One line for the reliability table: answers by code, e.g. `2310 x 200`."""
        parts = [f"{count} x {code}" for code, count in sorted(self.codes().items())]
        if self.problems:
            parts.append(f"{len(self.problems)} failed")
        return ", ".join(parts) or "no requests"


class Callers:
    """Concurrent callers asking replicas of a `Rotation` for tokens of some accounts."""

    def __init__(
        self,
        rotation: Rotation,
        key: str,
        accounts: Iterable[str],
        *,
        concurrency: int = 20,
        pause: float = 0.01,
    ) -> None:
        self.rotation = rotation
        self.accounts = list(accounts)
        self.report = LoadReport(tokens={name: set() for name in self.accounts})
        self._headers = {"Authorization": f"Bearer {key}"}
        self._concurrency = concurrency
        self._pause = pause

    async def run(
        self, seconds: float | None = None, *, until: asyncio.Event | None = None
    ) -> None:
        """Call until `seconds` have passed or `until` is set, whichever comes first."""
        deadline = time.monotonic() + (seconds if seconds is not None else 3600.0)
        stop = until or asyncio.Event()
        async with httpx.AsyncClient(timeout=30) as client:
            await asyncio.gather(
                *(self._caller(client, deadline, stop) for _ in range(self._concurrency))
            )

    async def _caller(
        self, client: httpx.AsyncClient, deadline: float, stop: asyncio.Event
    ) -> None:
        while time.monotonic() < deadline and not stop.is_set():
            name = random.choice(self.accounts)  # noqa: S311 - load spreading
            await self.call(client, name)
            await asyncio.sleep(self._pause)

    async def call(self, client: httpx.AsyncClient, name: str) -> None:
        """One token request for account `name`, recorded in the report."""
        url = f"{self.rotation.pick()}/v1/accounts/{name}/token"
        asked = time.time()
        try:
            response = await client.get(url, headers=self._headers)
        except httpx.TransportError as error:
            self.report.problems.append(f"{name}: {type(error).__name__}")
            return
        code = "-"
        if response.status_code == 200:
            body = response.json()
            self.report.problems.extend(self.judge(name, body, asked, time.time()))
            self.report.tokens[name].add(body["access_token"])
        else:
            code = response.json().get("code", "-")
            if "Retry-After" in response.headers:
                self.report.retry_after.append(int(response.headers["Retry-After"]))
        self.report.answers[name, response.status_code, code] += 1

    def judge(self, name: str, body: dict[str, Any], asked: float, answered: float) -> list[str]:
        """What is wrong with a token answer asked for at `asked` and received at `answered`
        (epoch seconds): here, a token expired or with less than a second left."""
        if read_claims(body["access_token"])["exp"] <= answered or body["expires_in"] < 1:
            return [f"{name}: token served with {body['expires_in']} s"]
        return []


class BackgroundLoad:
    """`Callers` running in the background from creation until `end()`."""

    def __init__(self, callers: Callers) -> None:
        self.callers = callers
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(callers.run(until=self._stop))

    async def end(self) -> LoadReport:
        """Stop the callers; what they saw."""
        self._stop.set()
        await self._task
        return self.callers.report


@dataclass(frozen=True)
class UpstreamCounts:
    """The simulator's counts of auth calls, by outcome, over all endpoints."""

    outcomes: Counter[str]

    @classmethod
    def read(cls, simulator: SimulatorControl, user: str | None = None) -> UpstreamCounts:
        """The counts since the simulator's last reset, for one user or all."""
        outcomes: Counter[str] = Counter()
        for row in simulator.stats()["calls"]:
            if user in (None, row["user"]):
                outcomes[row["outcome"]] += row["count"]
        return cls(outcomes)

    @classmethod
    def per_account(
        cls, simulator: SimulatorControl, accounts: Mapping[str, Mapping[str, str]]
    ) -> dict[str, UpstreamCounts]:
        """The counts since the simulator's last reset of each account's user, by account."""
        return {
            name: cls.read(simulator, settings["username"]) for name, settings in accounts.items()
        }

    @property
    def calls(self) -> int:
        """Calls that reached the simulator's handlers or its fault rules (429s excluded)."""
        return sum(count for outcome, count in self.outcomes.items() if outcome != "rate_limited")

    @property
    def rate_limited(self) -> int:
        """Calls the simulator's rate limiter refused with 429."""
        return self.outcomes["rate_limited"]

    @property
    def reused(self) -> int:
        """Refreshes with an already spent refresh token."""
        return self.outcomes["refresh_reused"]

    def describe(self) -> str:
        """Calls by outcome, e.g. `3 (ok 2, injected_status 1)`."""
        detail = ", ".join(f"{name} {count}" for name, count in sorted(self.outcomes.items()))
        return f"{self.calls} ({detail})" if detail else "0"


Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    """The samples of a broker's `/metrics`, by sample name."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(label) == wanted for label, wanted in labels.items())
    )


@dataclass(frozen=True)
class ReliabilityRow:
    """One scenario's line in the reliability table."""

    scenario: str
    injected: str
    callers_saw: str
    upstream_calls: str
    rate_limited: int
    reused: int

    def markdown(self) -> str:
        """The row as a Markdown table line."""
        cells = (
            self.scenario,
            self.injected,
            self.callers_saw,
            self.upstream_calls,
            str(self.rate_limited),
            str(self.reused),
        )
        return "| " + " | ".join(cells) + " |"


#: The name of the user property carrying a scenario's row on its test report.
RELIABILITY_PROPERTY = "reliability"

TABLE_HEADER = (
    "| scenario | injected | callers saw | upstream calls | 429s | reused refresh tokens |\n"
    "|---|---|---|---|---|---|"
)


@dataclass(frozen=True)
class Readiness:
    """What a replica's `/readyz` said: its status code and its store check's detail."""

    status: int
    detail: str


def readiness(url: str) -> Readiness:
    """Ask a replica's `/readyz`."""
    response = httpx.get(f"{url}/readyz", timeout=10)
    checks = response.json()["checks"]
    return Readiness(response.status_code, "; ".join(check["detail"] for check in checks))


def account_credentials(url: str, key: str) -> dict[str, str]:
    """Each account's `credentials` (`verified`, `rejected`, `unverified`) as one replica
    sees it."""
    return _account_field(url, key, "credentials")


def account_statuses(url: str, key: str) -> dict[str, str]:
    """Each account's status (`ok`, `refreshing`, `no_token`, ...) as one replica sees it."""
    return _account_field(url, key, "status")


def _account_field(url: str, key: str, field: str) -> dict[str, str]:
    response = httpx.get(
        f"{url}/v1/accounts", headers={"Authorization": f"Bearer {key}"}, timeout=10
    )
    response.raise_for_status()
    return {body["name"]: body[field] for body in response.json()["accounts"]}


async def ok_on_every_replica(urls: Iterable[str], key: str, name: str) -> None:
    """Wait until each replica's `/v1/accounts` says account `name` is `ok`."""
    for url in urls:
        await eventually(lambda url=url: account_statuses(url, key)[name] == "ok")  # type: ignore[misc]


def upstream_results(urls: Iterable[str]) -> Counter[str]:
    """Upstream attempts by `result` label, summed over the replicas' `/metrics`."""
    results: Counter[str] = Counter()
    for url in urls:
        for labels, value in scrape(url).get("monogoto_broker_upstream_requests_total", []):
            results[labels["result"]] += int(value)
    return results


@dataclass(frozen=True)
class Cadence:
    """Upstream calls per account against the refresh cycles a steady run allowed."""

    per_account: dict[str, UpstreamCounts]
    total: UpstreamCounts
    cycles: float
    cycle_seconds: float

    @classmethod
    def read(
        cls,
        simulator: SimulatorControl,
        accounts: Mapping[str, Mapping[str, str]],
        *,
        elapsed: float,
        fraction: float,
        lifetime: float,
    ) -> Cadence:
        """The counts since the simulator's reset; `elapsed` runs from the first replica's
        start, so the cycle count is an upper bound."""
        cycle_seconds = fraction * lifetime
        return cls(
            per_account=UpstreamCounts.per_account(simulator, accounts),
            total=UpstreamCounts.read(simulator),
            cycles=elapsed / cycle_seconds,
            cycle_seconds=cycle_seconds,
        )

    def describe(self) -> str:
        """The "upstream calls" cell of the reliability table."""
        per_account = {name: counts.calls for name, counts in self.per_account.items()}
        return (
            f"{self.total.describe()}; per account {per_account} "
            f"in at most {self.cycles:.1f} refresh cycles"
        )

    def check(self, report: LoadReport, called_seconds: float) -> None:
        """Every request answered with a valid token; one upstream call per cycle and account
        plus the first login; tokens renewed cycle after cycle while callers called; no 429,
        no reused refresh token."""
        assert report.problems == []
        assert report.failed() == 0
        for name, counts in self.per_account.items():
            assert counts.calls <= self.cycles + 1, f"{name}: more upstream calls than cycles"
            # Jitter makes a cycle up to 10 % longer.
            renewals = called_seconds / (self.cycle_seconds * 1.1) - 1
            assert len(report.tokens[name]) >= renewals, f"{name}: not renewed every cycle"
        assert self.total.rate_limited == 0
        assert self.total.reused == 0
