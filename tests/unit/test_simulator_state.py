"""Pure logic of the simulator: rate limiter, tokens, faults, settings, counting."""

from __future__ import annotations

from typing import Any

import jwt
import pytest
from pydantic import ValidationError

from service.simulator.auth import answer
from service.simulator.faults import FaultBook, FaultRule
from service.simulator.limiter import SlidingLog
from service.simulator.protected import protected_answer
from service.simulator.state import SimulatorSettings, SimulatorState
from service.simulator.tokens import Dialect, TokenIssuer, identity

USERS = {"ops@example.com": "s3cret"}
LOGIN = b'{"username": "ops@example.com", "password": "s3cret"}'


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_limiter_admits_up_to_the_limit_then_says_when_to_retry() -> None:
    """N calls pass with decreasing remaining; the next is refused until the oldest ages out."""
    clock = Clock(0)
    log = SlidingLog(clock)
    assert log.admit("k", limit=2, period=60).remaining == 1
    clock.now = 10
    assert log.admit("k", limit=2, period=60).remaining == 0
    clock.now = 20.5
    refused = log.admit("k", limit=2, period=60)
    assert not refused.allowed
    assert refused.remaining == 0
    assert refused.retry_after == 40  # 39.5 s, rounded up


def test_limiter_retry_after_is_at_least_one_second() -> None:
    """Moments before a slot frees up, Retry-After still says 1, never 0."""
    clock = Clock(0)
    log = SlidingLog(clock)
    log.admit("k", limit=1, period=60)
    clock.now = 59.999
    assert log.admit("k", limit=1, period=60).retry_after == 1


def test_limiter_does_not_log_refused_calls() -> None:
    """Refused calls don't count: the slot frees exactly when the oldest admitted call leaves."""
    clock = Clock(0)
    log = SlidingLog(clock)
    log.admit("k", limit=1, period=60)
    for second in range(1, 60):
        clock.now = second
        assert not log.admit("k", limit=1, period=60).allowed
    clock.now = 60
    assert log.admit("k", limit=1, period=60).allowed


def test_limiter_keys_are_independent() -> None:
    """A full window for one key does not affect another."""
    log = SlidingLog(Clock())
    log.admit(("v1_token", "10.0.0.1"), limit=1, period=60)
    assert not log.admit(("v1_token", "10.0.0.1"), limit=1, period=60).allowed
    assert log.admit(("v1_token", "10.0.0.2"), limit=1, period=60).allowed
    assert log.admit(("legacy_auth", "10.0.0.1"), limit=1, period=60).allowed


def test_limiter_lowered_limit_waits_for_enough_calls_to_leave() -> None:
    """After lowering the limit, Retry-After waits until enough calls left, not just the oldest."""
    clock = Clock(0)
    log = SlidingLog(clock)
    for second in (0, 10, 20):
        clock.now = second
        log.admit("k", limit=3, period=60)
    clock.now = 30
    assert log.admit("k", limit=1, period=60).retry_after == 50


def test_limiter_clear_forgets_calls() -> None:
    """After clear the whole budget is available again."""
    log = SlidingLog(Clock())
    log.admit("k", limit=1, period=60)
    log.clear()
    assert log.admit("k", limit=1, period=60).allowed


def test_refresh_tokens_are_single_use() -> None:
    """A refresh token redeems once; again it is reported as reused, by its owner."""
    tokens = TokenIssuer(Clock())
    token = tokens.refresh_token("ops@example.com", lifetime=60)
    assert tokens.owner(token) == "ops@example.com"
    assert tokens.redeem(token).outcome == "ok"
    reused = tokens.redeem(token)
    assert (reused.outcome, reused.user) == ("refresh_reused", "ops@example.com")


def test_refresh_token_expires_on_the_skewed_clock() -> None:
    """Expiry is judged by the simulator's clock, skew included; expired means invalid."""
    clock = Clock()
    tokens = TokenIssuer(clock)
    token = tokens.refresh_token("ops@example.com", lifetime=60)
    assert tokens.redeem(token, skew=61).outcome == "refresh_invalid"
    clock.now += 30
    assert tokens.redeem(token).outcome == "ok"


def test_spent_refresh_token_is_invalid_once_expired() -> None:
    """An expired token is invalid whether or not it was spent, also long after expiry."""
    clock = Clock()
    tokens = TokenIssuer(clock)
    spent = tokens.refresh_token("ops@example.com", lifetime=60)
    unused = tokens.refresh_token("ops@example.com", lifetime=60)
    tokens.redeem(spent)
    clock.now += 61
    assert tokens.redeem(spent).outcome == "refresh_invalid"
    clock.now += 2 * 24 * 3600
    assert tokens.redeem(spent).outcome == "refresh_invalid"
    assert tokens.redeem(unused, skew=-2 * 24 * 3600).outcome == "refresh_invalid"


@pytest.mark.parametrize("kind", ["garbage", "foreign", "access"])
def test_foreign_tokens_do_not_redeem(kind: str) -> None:
    """Garbage, other issuers' JWTs and access tokens are invalid refresh tokens."""
    tokens = TokenIssuer(Clock())
    token = {
        "garbage": "not-a-token",
        "foreign": TokenIssuer(Clock()).refresh_token("ops@example.com", lifetime=60),
        "access": tokens.access_token("ops@example.com", lifetime=60),
    }[kind]
    assert tokens.redeem(token).outcome == "refresh_invalid"


def test_access_token_claims_follow_clock_and_skew() -> None:
    """iat is the skewed server time and exp = iat + lifetime; CustomerId is embedded."""
    tokens = TokenIssuer(Clock(1_000.7))
    claims = jwt.decode(
        tokens.access_token("ops@example.com", lifetime=30, skew=100),
        options={"verify_signature": False},
    )
    assert (claims["iat"], claims["exp"]) == (1_100, 1_130)
    assert claims["CustomerId"] == identity("ops@example.com").customer_id


def test_fault_rules_apply_in_order_for_their_endpoint() -> None:
    """The first rule with uses left that matches the endpoint is used up."""
    book = FaultBook()
    book.add(FaultRule(endpoint="v1_refresh", kind="drop"))
    book.add(FaultRule(kind="status", status=503, count=2))
    assert book.take("v1_token") == FaultRule(kind="status", status=503, count=2)
    taken = book.take("v1_refresh")
    assert taken is not None
    assert taken.kind == "drop"
    assert book.take("v1_refresh") is not None
    assert book.take("legacy_auth") is None
    assert [rule["remaining"] for rule in book.listing()] == [0, 0]


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "status"},
        {"kind": "status", "status": 503, "seconds": 1.0},
        {"kind": "delay"},
        {"kind": "garbage"},
        {"kind": "drop", "body": "not_json"},
        {"kind": "status", "status": 700},
    ],
)
def test_fault_rule_parameters_must_fit_the_kind(fields: dict[str, Any]) -> None:
    """Each kind requires its parameters and refuses the others'."""
    with pytest.raises(ValidationError):
        FaultRule.model_validate(fields)


def test_settings_update_is_partial_and_validated() -> None:
    """An update changes only the given fields; invalid values raise and change nothing."""
    settings = SimulatorSettings()
    updated = settings.updated({"rate_limit": 2})
    assert updated == settings.model_copy(update={"rate_limit": 2})
    with pytest.raises(ValidationError):
        settings.updated({"rate_period_seconds": 0})


def test_state_counts_calls_and_reset_keeps_users_and_tokens() -> None:
    """Stats are sorted with totals; a reset clears them but not users or issued tokens."""
    sim = SimulatorState(USERS, SimulatorSettings(rate_limit=1), monotonic=Clock())
    assert sim.authenticate("ops@example.com", "s3cret")
    assert not sim.authenticate("ops@example.com", "wrong")
    assert not sim.authenticate("nobody", "s3cret")
    token = sim.tokens.refresh_token("ops@example.com", lifetime=60)
    sim.count("v1_token", "b", "ok")
    sim.count("v1_token", "a", "ok")
    sim.count("legacy_auth", "a", "rejected")
    stats = sim.stats()
    assert [(row["endpoint"], row["user"]) for row in stats["calls"]] == [
        ("legacy_auth", "a"),
        ("v1_token", "a"),
        ("v1_token", "b"),
    ]
    assert stats["totals"] == {"v1_token": {"ok": 2}, "legacy_auth": {"rejected": 1}}
    sim.settings = sim.settings.updated({"rate_limit": 9})
    sim.reset()
    assert sim.stats() == {"calls": [], "totals": {}}
    assert sim.settings.rate_limit == 1
    assert sim.tokens.redeem(token).outcome == "ok"


def test_answer_refused_call_is_counted_and_leaves_faults_armed() -> None:
    """A rate-limited call is counted as such and does not use up a fault."""
    sim = SimulatorState(USERS, SimulatorSettings(rate_limit=1), monotonic=Clock())
    answer(sim, "v1_token", "10.0.0.1", LOGIN)
    sim.faults.add(FaultRule(kind="drop"))
    refused = answer(sim, "v1_token", "10.0.0.1", LOGIN)
    assert (refused.status, refused.outcome, refused.user) == (
        429,
        "rate_limited",
        "ops@example.com",
    )
    assert refused.headers["Retry-After"] == "60"
    assert sim.faults.listing()[0]["remaining"] == 1


def test_answer_dropped_refresh_still_spends_the_token() -> None:
    """A dropped refresh call has taken effect: the client's token is spent."""
    sim = SimulatorState(USERS, monotonic=Clock())
    token = sim.tokens.refresh_token("ops@example.com", lifetime=60)
    sim.faults.add(FaultRule(kind="drop", endpoint="v1_refresh"))
    dropped = answer(sim, "v1_refresh", "c", f'{{"refresh_token": "{token}"}}'.encode())
    assert dropped.drop
    assert dropped.outcome == "dropped"
    assert sim.tokens.redeem(token).outcome == "refresh_reused"


def test_answer_delay_adds_fault_seconds_to_latency() -> None:
    """A delay fault adds its seconds to the configured latency and otherwise answers normally."""
    sim = SimulatorState(USERS, SimulatorSettings(latency_seconds=0.25), monotonic=Clock())
    sim.faults.add(FaultRule(kind="delay", seconds=2))
    delayed = answer(sim, "v1_token", "c", LOGIN)
    assert (delayed.status, delayed.outcome, delayed.delay) == (200, "ok", 2.25)


def test_access_token_verdicts_in_order() -> None:
    """Foreign, refresh and other-dialect tokens are invalid; then expired (skewed clock); ok."""
    clock = Clock()
    tokens = TokenIssuer(clock)
    token = tokens.access_token("ops@example.com", lifetime=60, dialect="legacy")
    foreign = TokenIssuer(clock).access_token("ops@example.com", lifetime=60, dialect="legacy")
    refresh = tokens.refresh_token("ops@example.com", lifetime=60)

    def verdict(presented: str, dialect: Dialect = "legacy", skew: float = 0.0) -> tuple[str, str]:
        judged = tokens.verify_access(presented, dialect=dialect, skew=skew)
        return judged.outcome, judged.user

    assert verdict(token) == ("ok", "ops@example.com")
    assert verdict(foreign) == ("token_invalid", "-")
    assert verdict("not-a-token") == ("token_invalid", "-")
    assert verdict(refresh) == ("token_invalid", "ops@example.com")
    assert verdict(token, dialect="v1") == ("token_invalid", "ops@example.com")
    assert verdict(token, skew=60) == ("token_expired", "ops@example.com")
    clock.now += 60
    assert verdict(token) == ("token_expired", "ops@example.com")


def test_revoke_refuses_earlier_tokens_only() -> None:
    """A revoke refuses the user's earlier access and refresh tokens, not later or others'."""
    tokens = TokenIssuer(Clock())
    access = tokens.access_token("ops@example.com", lifetime=60)
    refresh = tokens.refresh_token("ops@example.com", lifetime=60)
    spent = tokens.refresh_token("ops@example.com", lifetime=60)
    other = tokens.access_token("fleet@example.com", lifetime=60)
    tokens.redeem(spent)

    tokens.revoke("ops@example.com")

    assert tokens.verify_access(access, dialect="v1").outcome == "token_revoked"
    assert tokens.redeem(refresh).outcome == "refresh_revoked"
    assert tokens.redeem(spent).outcome == "refresh_reused"  # reuse is the louder news
    assert tokens.verify_access(other, dialect="v1").outcome == "ok"
    later = tokens.access_token("ops@example.com", lifetime=60)
    assert tokens.verify_access(later, dialect="v1").outcome == "ok"
    assert tokens.redeem(tokens.refresh_token("ops@example.com", lifetime=60)).outcome == "ok"


def test_expired_and_revoked_token_counts_as_expired() -> None:
    """Expiry is judged before revocation."""
    clock = Clock()
    tokens = TokenIssuer(clock)
    token = tokens.access_token("ops@example.com", lifetime=60)
    tokens.revoke("ops@example.com")
    clock.now += 61
    assert tokens.verify_access(token, dialect="v1").outcome == "token_expired"


def test_state_revoke_knows_only_its_users() -> None:
    """Revoking an unknown user is refused (the control API answers 404)."""
    sim = SimulatorState(USERS)
    assert sim.revoke("ops@example.com")
    assert not sim.revoke("nobody@example.com")


def test_fault_rules_without_endpoint_apply_to_auth_endpoints_only() -> None:
    """A rule for any endpoint leaves protected endpoints alone; one naming them applies."""
    book = FaultBook()
    book.add(FaultRule(kind="drop"))
    book.add(FaultRule(endpoint="v1_things", kind="delay", seconds=1))
    taken = book.take("v1_things")
    assert taken is not None
    assert taken.kind == "delay"
    assert book.take("v1_things") is None
    assert book.take("legacy_things") is None
    assert book.take("legacy_auth") is not None


@pytest.mark.parametrize("endpoint", ["legacy_things", "v1_things"])
def test_garbage_rules_cannot_name_protected_endpoints(endpoint: str) -> None:
    """Garbage bodies are broken login answers; protected endpoints have none."""
    with pytest.raises(ValidationError, match="auth endpoints only"):
        FaultRule.model_validate({"endpoint": endpoint, "kind": "garbage", "body": "not_json"})


def test_protected_answer_ignores_latency_and_counts_the_owner() -> None:
    """Protected calls skip the auth latency, take their own delay rule and count the owner."""
    sim = SimulatorState(USERS, SimulatorSettings(latency_seconds=5), monotonic=Clock())
    token = sim.tokens.access_token("ops@example.com", lifetime=60)
    sim.faults.add(FaultRule(endpoint="v1_things", kind="delay", seconds=0.5))
    delayed = protected_answer(sim, "v1_things", f"Bearer {token}")
    plain = protected_answer(sim, "v1_things", f"bearer  {token} ")
    refused = protected_answer(sim, "legacy_things", f"Bearer {token}")
    assert (delayed.status, delayed.delay, plain.status, plain.delay) == (200, 0.5, 200, 0.0)
    assert (refused.status, refused.media_type) == (401, "text/plain")
    assert isinstance(refused.content, str)
    assert refused.content.startswith("Access denied: invalid access token (issued for")
    assert sim.stats()["totals"] == {"v1_things": {"ok": 2}, "legacy_things": {"token_invalid": 1}}
