"""What the Sentinel and Cluster forms of `redis_url` connect to."""

from __future__ import annotations

from service.config.redis_url import parse_store_url


def test_sentinel_url_names_the_sentinels_the_master_and_the_database() -> None:
    """Sentinels default to port 26379; the path is the master's name, then the database."""
    address = parse_store_url(
        "rediss+sentinel://app:p%40ss@redis-a:26380,redis-b,[fd00::1]/my%20master/3"
        "?sentinel_password=sp&ssl_cert_reqs=none"
    )
    assert address.kind == "sentinel"
    assert address.tls
    assert address.hosts == (("redis-a", 26380), ("redis-b", 26379), ("fd00::1", 26379))
    assert (address.username, address.password) == ("app", "p@ss")
    assert (address.service_name, address.db) == ("my master", 3)
    assert dict(address.options) == {"sentinel_password": "sp", "ssl_cert_reqs": "none"}


def test_cluster_url_names_seed_nodes_on_the_default_port() -> None:
    """Cluster seeds default to port 6379; without credentials none are sent."""
    address = parse_store_url("redis+cluster://node-1,node-2:7001")
    assert address.kind == "cluster"
    assert not address.tls
    assert address.hosts == (("node-1", 6379), ("node-2", 7001))
    assert (address.username, address.password, address.db) == (None, None, 0)


def test_the_password_is_never_in_the_address_repr() -> None:
    """A logged or printed address does not show the password."""
    address = parse_store_url("redis+cluster://user:hunter2@node-1?socket_timeout=2")
    assert "hunter2" not in repr(address)
