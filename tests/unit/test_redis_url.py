"""What the forms of `redis_url` connect to, and which ports and query parameters check-config
takes."""

from __future__ import annotations

import re

import pytest

from service.config.redis_url import check_store_url, parse_store_url


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


# Every form that names hosts, with `{port}` where a port goes: the password is "s3cret".
URL_FORMS = [
    "redis://:s3cret@127.0.0.1:{port}/0",
    "rediss://app:s3cret@redis.example:{port}",
    "redis://[::1]:{port}/2",
    "redis+sentinel://:s3cret@redis-a:26379,redis-b:{port}/mymaster/0",
    "rediss+sentinel://app:s3cret@[fd00::1]:{port}/mymaster",
    "redis+cluster://:s3cret@node-1:{port}",
    "rediss+cluster://app:s3cret@node-1:7000,node-2:{port}?ssl_cert_reqs=none",
]


@pytest.mark.parametrize("form", URL_FORMS)
@pytest.mark.parametrize("port", ["0", "65536", "637900", "99999999999999999999", "x", "", "²"])
def test_a_port_outside_1_to_65535_is_refused_in_every_form(form: str, port: str) -> None:
    """check-config refuses the URL in one line naming the host, never the password."""
    with pytest.raises(ValueError, match=r"^bad port for host '[^']+': must be a number 1-65535$"):
        check_store_url(form.format(port=port))


@pytest.mark.parametrize("form", URL_FORMS)
@pytest.mark.parametrize("port", ["1", "6379", "65535"])
def test_a_port_from_1_to_65535_is_taken_in_every_form(form: str, port: str) -> None:
    check_store_url(form.format(port=port))


@pytest.mark.parametrize(
    "url", ["redis://", "redis://:s3cret@/0", "redis://redis.example/0", "rediss://[::1]/0"]
)
def test_a_server_url_without_a_port_is_taken(url: str) -> None:
    """Without a port the client takes 6379 (and without a host, localhost)."""
    check_store_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://:s3c/r3t@127.0.0.1:6379/0",
        "redis://ops:s3c?r3t@redis:6379/0",
        "redis://s3c:r3t/x@redis:6379/0",
        "redis+sentinel://:s3c/r3t@redis:26379/mymaster",
        "redis+cluster://ops:s3c#r3t@node-1:7000",
    ],
)
def test_a_password_with_an_unencoded_delimiter_is_not_echoed(url: str) -> None:
    """An unencoded '/', '?' or '#' ends the host part inside the password: what stands where a
    host or port goes is then part of it, so the line names neither and says what to encode."""
    with pytest.raises(ValueError, match="percent-encode") as caught:
        check_store_url(url)
    assert "s3c" not in str(caught.value)
    assert "r3t" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "rediss://:s3cret@redis:6380/0?ssl_ca_certs=/etc/ca/redis-ca.crt",
        "rediss://:s3cret@redis:6380/0?ssl_cert_reqs=none&ssl_check_hostname=false",
        "redis://:s3cret@redis/0?client_name=broker&health_check_interval=10",
        "unix:///run/redis.sock?db=2",
    ],
)
def test_query_parameters_the_redis_client_takes_pass(url: str) -> None:
    """A server URL's query parameters go to the Redis client as they are."""
    check_store_url(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://:s3cret@redis/0?tiemout=2", "unknown query parameter 'tiemout'"),
        ("rediss://:s3cret@redis/0?sentinel_password=s3cret", "unknown query parameter"),
        ("unix:///run/redis.sock?socket_timout=1", "unknown query parameter 'socket_timout'"),
        ("redis://:s3cret@redis/0?socket_timeout=s3cret", "query parameter 'socket_timeout': a"),
        ("unix:///run/redis.sock?db=two", "query parameter 'db': a value"),
        ("rediss://:s3cret@redis/0?ssl_cert_reqs=s3cret", "refuses a query parameter's value"),
        ("redis://:s3cret@redis/0?protocol=4", "protocol must be either 2 or 3"),
    ],
)
def test_query_parameters_the_redis_client_refuses_are_one_line(url: str, message: str) -> None:
    """What would otherwise fail every store command (an unknown name) or the start (a value
    the client cannot take) is refused by check-config, naming the parameter, not its value."""
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        check_store_url(url)
    assert "\n" not in str(caught.value)
    assert "s3cret" not in str(caught.value)
