"""The per-account gauges are read from the accounts at each scrape."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.metrics import AccountCollector, AccountGauges

EXPIRY = "monogoto_broker_token_expiry_timestamp_seconds"
REJECTED = "monogoto_broker_credentials_rejected"
CREDENTIALS = "monogoto_broker_account_credentials"


def test_every_account_of_every_attached_broker_is_scraped_as_it_is_now() -> None:
    """Each account has its series (the expiry only with a token, one `account_credentials`
    series per state, 1 for its own); a change shows at the next scrape, an account that goes
    or a broker that detaches leaves no series behind."""
    accounts = {
        "fleet-eu": AccountGauges("fleet-eu", 1_900_000_000.0, False, "verified"),
        "fleet-us": AccountGauges("fleet-us", None, True, "rejected"),
    }
    others = [AccountGauges("spare", 1_800_000_000.0, False, "unverified")]
    collector = AccountCollector()
    registry = CollectorRegistry()
    registry.register(collector)

    def ours() -> list[AccountGauges]:
        return list(accounts.values())

    def theirs() -> list[AccountGauges]:
        return others

    collector.attach(ours)
    collector.attach(theirs)
    value = registry.get_sample_value
    assert value(EXPIRY, {"account": "fleet-eu"}) == 1_900_000_000.0
    assert value(EXPIRY, {"account": "fleet-us"}) is None
    assert value(EXPIRY, {"account": "spare"}) == 1_800_000_000.0
    assert [value(REJECTED, {"account": name}) for name in ("fleet-eu", "fleet-us")] == [0, 1]
    states = ("verified", "rejected", "unverified")
    assert [value(CREDENTIALS, {"account": "fleet-us", "state": s}) for s in states] == [0, 1, 0]

    accounts["fleet-us"] = AccountGauges("fleet-us", 1_900_000_100.0, False, "verified")
    del accounts["fleet-eu"]
    collector.detach(theirs)
    assert value(EXPIRY, {"account": "fleet-us"}) == 1_900_000_100.0
    assert [value(CREDENTIALS, {"account": "fleet-us", "state": s}) for s in states] == [1, 0, 0]
    for gone in ("fleet-eu", "spare"):
        assert value(REJECTED, {"account": gone}) is None
        assert value(CREDENTIALS, {"account": gone, "state": "verified"}) is None
