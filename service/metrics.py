"""The broker's Prometheus metrics (docs/api.md, "Metrics").

Labels only ever carry configured names (accounts, callers) and fixed vocabularies, never a
token, a raw path or other user-supplied text. With several worker processes the metrics are
aggregated through prometheus-client's multiprocess mode (see `serve`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

PREFIX = "monogoto_broker_"
# Set by `serve` with several workers: prometheus-client's multiprocess mode.
_MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Decided at import, as prometheus-client decides where its values live.
MULTIPROCESS = _MULTIPROCESS_ENV in os.environ

TOKEN_REQUESTS = Counter(
    PREFIX + "token_requests_total",
    "Token requests by account, caller and outcome (local, shared, fetched, denied, error).",
    ["account", "caller", "outcome"],
)
UPSTREAM_REQUESTS = Counter(
    PREFIX + "upstream_requests_total",
    "Login and refresh attempts sent to Monogoto, retries included, by result.",
    ["account", "operation", "result"],
)
UPSTREAM_DURATION = Histogram(
    PREFIX + "upstream_request_duration_seconds",
    "Duration of single login and refresh attempts.",
    ["operation"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
AUTH_BUDGET_DENIED = Counter(
    PREFIX + "auth_budget_denied_total",
    "Upstream attempts not made because the shared auth budget was exhausted or cooling down.",
)
LOCK_WAIT = Histogram(
    PREFIX + "lock_wait_seconds",
    "Time spent waiting for another replica's login or refresh of the same account.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CALLER_AUTH_FAILURES = Counter(
    PREFIX + "caller_auth_failures_total",
    "Rejected caller requests by reason (missing, unknown, forbidden, invalid_token, "
    "keys_unavailable).",
    ["reason"],
)
JWKS_FETCHES = Counter(
    PREFIX + "jwks_fetches_total",
    "Fetches of the service-account issuer's signing keys (JWKS), by result (ok, error).",
    ["result"],
)
# Every worker plans the same accounts on the same budget from the same shared records, so
# they agree but for a few seconds; their maximum errs on the side of an alert.
AUTH_BUDGET_UTILISATION = Gauge(
    PREFIX + "auth_budget_utilisation",
    "Planned load on the shared auth budget over its capacity: above 1, it cannot keep every "
    "account renewed (the highest of the budgets, one per Monogoto base URL).",
    multiprocess_mode="max",
)
ACCOUNTS_AT_RISK = Gauge(
    PREFIX + "accounts_at_risk",
    "Accounts whose next renewal the plan cannot make before their deadline.",
    multiprocess_mode="max",
)
STORE_ERRORS = Counter(
    PREFIX + "store_errors_total",
    "Operations on the shared store that failed (Redis unreachable or too slow).",
    ["operation"],
)
STORE_FAILOVERS = Counter(
    PREFIX + "store_failovers_total",
    "Times the store's epoch changed: a master restarted or a replica took over (failover).",
)
UNREPLICATED_NOTES = Counter(
    PREFIX + "store_unreplicated_notes_total",
    "Refresh tokens noted as spent that no store replica acknowledged in time (a login was "
    "made instead of the refresh).",
)
CONFIG_RELOADS = Counter(
    PREFIX + "config_reload_total",
    "Config reloads by result: applied, unchanged, invalid (not valid; the old config stays), "
    "refused (changes settings that need a restart; the old config stays).",
    ["result"],
)
AUDIT_LINES = Counter(
    PREFIX + "audit_lines_total",
    "Audit log lines by event (token.get, token.invalidate) and outcome (issued, forced, "
    "invalidated, denied, failed).",
    ["event", "outcome"],
)
AUDIT_WRITE_FAILURES = Counter(
    PREFIX + "audit_write_failures_total",
    "Audit log lines that could not be written (lost, or their token request answered 503).",
)

# Labelled children of TOKEN_REQUESTS, looked up once: keys are configured names and a fixed
# vocabulary, so the table stays as small as the label set itself.
_token_requests: dict[tuple[str, str, str], Counter] = {}


def token_requests(account: str, caller: str, outcome: str) -> Counter:
    """The `token_requests_total` series of one account, caller and outcome."""
    key = (account, caller, outcome)
    child = _token_requests.get(key)
    if child is None:
        child = _token_requests[key] = TOKEN_REQUESTS.labels(account, caller, outcome)
    return child


class _Spec(NamedTuple):
    """A per-account gauge: its name, help and label names."""

    name: str
    documentation: str
    labels: tuple[str, ...]


_TOKEN_EXPIRY = _Spec(
    PREFIX + "token_expiry_timestamp_seconds",
    "Unix time at which the account's current access token expires.",
    ("account",),
)
_CREDENTIALS_REJECTED = _Spec(
    PREFIX + "credentials_rejected",
    "1 while Monogoto rejects the account's credentials, else 0.",
    ("account",),
)
_ACCOUNT_CREDENTIALS = _Spec(
    PREFIX + "account_credentials",
    "1 for the account's credentials state (verified, rejected, unverified), 0 for the others.",
    ("account", "state"),
)
CREDENTIALS_STATES = ("verified", "rejected", "unverified")


@dataclass(frozen=True, slots=True)
class AccountGauges:
    """One account's per-account gauges, as its broker holds them."""

    account: str
    expires_at: float | None  # None without a token: no sample
    rejected: bool
    credentials: str  # one of CREDENTIALS_STATES


AccountSource = Callable[[], Iterable[AccountGauges]]


class AccountCollector:
    """The per-account gauges of one process, read from its brokers' accounts at each scrape.

    Nothing is kept per account between scrapes: an account removed by a reload has no series
    at the next one, and a thousand accounts cost no metric objects (prometheus-client keeps
    three quarters of a kilobyte per labelled series). A broker attaches while it runs.
    """

    def __init__(self) -> None:
        self._sources: list[AccountSource] = []

    def attach(self, source: AccountSource) -> None:
        """Report the accounts `source` yields, from the next scrape on."""
        self._sources.append(source)

    def detach(self, source: AccountSource) -> None:
        """Stop reporting `source`'s accounts (if it was attached)."""
        if source in self._sources:
            self._sources.remove(source)

    def describe(self) -> Iterable[Metric]:
        """The families, without samples (the registry checks their names)."""
        return _families()

    def collect(self) -> Iterable[Metric]:
        """Every attached broker's accounts, as they are now."""
        expiry, rejected, credentials = families = _families()
        for source in list(self._sources):
            for gauges in source():
                account = gauges.account
                if gauges.expires_at is not None:
                    expiry.add_metric([account], gauges.expires_at)
                rejected.add_metric([account], 1.0 if gauges.rejected else 0.0)
                for state in CREDENTIALS_STATES:
                    value = 1.0 if state == gauges.credentials else 0.0
                    credentials.add_metric([account, state], value)
        return families


def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
    """The per-account families, empty."""

    def family(spec: _Spec) -> GaugeMetricFamily:
        return GaugeMetricFamily(spec.name, spec.documentation, labels=spec.labels)

    return family(_TOKEN_EXPIRY), family(_CREDENTIALS_REJECTED), family(_ACCOUNT_CREDENTIALS)


ACCOUNTS = AccountCollector()
if MULTIPROCESS:
    # Several workers: each writes its accounts' values to prometheus-client's files, which the
    # scrape sums up (the highest value of each series). Series cannot be removed there: a
    # removed account's stay until the workers restart.
    _FILE_GAUGES = [
        Gauge(spec.name, spec.documentation, spec.labels, multiprocess_mode="max")
        for spec in (_TOKEN_EXPIRY, _CREDENTIALS_REJECTED, _ACCOUNT_CREDENTIALS)
    ]
else:
    REGISTRY.register(ACCOUNTS)


def publish(gauges: AccountGauges) -> None:
    """Record an account's gauges after a change: written to the files with several workers,
    nothing to do otherwise (the scrape reads the accounts themselves)."""
    if not MULTIPROCESS:
        return
    expiry, rejected, credentials = _FILE_GAUGES
    if gauges.expires_at is not None:
        expiry.labels(gauges.account).set(gauges.expires_at)
    rejected.labels(gauges.account).set(1 if gauges.rejected else 0)
    for state in CREDENTIALS_STATES:
        credentials.labels(gauges.account, state).set(1 if state == gauges.credentials else 0)
