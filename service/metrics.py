"""The broker's Prometheus metrics (docs/api.md, "Metrics").

Labels only ever carry configured names (accounts, callers) and fixed vocabularies, never a
token, a raw path or other user-supplied text. With several worker processes the metrics are
aggregated through prometheus-client's multiprocess mode (see `serve`).
"""

from __future__ import annotations

import os

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "monogoto_broker_"
# Set by `serve` with several workers: prometheus-client's multiprocess mode.
_MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

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
TOKEN_EXPIRY = Gauge(
    PREFIX + "token_expiry_timestamp_seconds",
    "Unix time at which the account's current access token expires.",
    ["account"],
    multiprocess_mode="max",
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
CREDENTIALS_REJECTED = Gauge(
    PREFIX + "credentials_rejected",
    "1 while Monogoto rejects the account's credentials, else 0.",
    ["account"],
    multiprocess_mode="max",
)
ACCOUNT_CREDENTIALS = Gauge(
    PREFIX + "account_credentials",
    "1 for the account's credentials state (verified, rejected, unverified), 0 for the others.",
    ["account", "state"],
    multiprocess_mode="max",
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


def forget_account(account: str) -> None:
    """Drop the gauges of an account a config reload removed, so that its last token expiry
    cannot set off the expiry alert. prometheus-client cannot drop series in multiprocess mode
    (several workers): there they stay until the workers restart."""
    if _MULTIPROCESS_ENV in os.environ:
        return
    for gauge in (TOKEN_EXPIRY, CREDENTIALS_REJECTED):
        gauge.remove(account)
    for state in ("verified", "rejected", "unverified"):
        ACCOUNT_CREDENTIALS.remove(account, state)
