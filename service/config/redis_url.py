"""The `redis_url` forms: one server, a master that Sentinel watches, or a Redis Cluster.

- `redis://`, `rediss://`, `unix://`: one server (or a fixed endpoint in front of several);
- `redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/SERVICE[/DB]` (and
  `rediss+sentinel://`): the sentinels to ask for the master named SERVICE;
- `redis+cluster://[[user]:password@]host[:port][,host[:port]...]` (and `rediss+cluster://`):
  any nodes of a cluster, as seeds;
- `memory://`: the in-process store.

`check_store_url` checks a URL without connecting and says what is wrong in words that never
contain the password (docs/configuration.md, "Redis URL").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio.connection import ConnectionPool
from redis.exceptions import RedisError

Kind = Literal["memory", "standalone", "sentinel", "cluster"]

#: Every scheme `redis_url` may have; `memory://` is the in-process store.
STORE_SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "memory",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)
_DEFAULT_PORTS: dict[str, int] = {"sentinel": 26379, "cluster": 6379}
_QUERY = {
    "sentinel": {"sentinel_username", "sentinel_password", "socket_timeout"},
    "cluster": {"socket_timeout"},
}
_TLS_QUERY = {"ssl_ca_certs", "ssl_cert_reqs"}
_CERT_REQS = ("required", "none")
# The name in the Redis client's errors about an unknown option and an invalid value.
_NAMED_OPTION = re.compile(r"(?:unexpected keyword argument|Invalid value for) '([^']+)'")
# Said instead of a host that may be part of a password (see _names_hosts).
_ENCODE_HINT = " (percent-encode '/', '?' and '#' in the user and password)"


@dataclass(frozen=True)
class StoreAddress:
    """A parsed `redis_url` of the sentinel or cluster form (the others stay URLs)."""

    kind: Kind
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    service_name: str = ""
    db: int = 0
    options: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def host_list(self) -> str:
        """The hosts as `host:port,host:port` (for logs)."""
        return ",".join(f"{host}:{port}" for host, port in self.hosts)


def scheme_of(url: str) -> str:
    """The URL's scheme, '' if it has none or cannot be split."""
    try:
        return urlsplit(url).scheme
    except ValueError:
        return ""


def check_store_url(url: str) -> None:
    """Raise ValueError, with a message that never echoes the password, unless `url` is a
    `redis_url` the broker can use."""
    scheme = scheme_of(url)
    if scheme not in STORE_SCHEMES:
        raise ValueError(
            "must be a redis://, rediss://, unix://, memory://, redis+sentinel:// or "
            "redis+cluster:// URL (rediss+sentinel:// and rediss+cluster:// for TLS)"
        )
    if "+" in scheme:
        parse_store_url(url)
        return
    if scheme in ("redis", "rediss"):
        _check_server(url)
    if scheme != "memory":
        _check_client_options(url)


def _check_server(url: str) -> None:
    """The port of a `redis://` or `rediss://` URL, when it names one, is 1-65535 (without a
    host the client takes localhost, as it always has)."""
    netloc = urlsplit(url).netloc
    server = netloc.rpartition("@")[2]
    host, colon, port = _split_host(server)
    if colon:
        _port(port, host, named=_names_hosts(url, netloc))


def _check_client_options(url: str) -> None:
    """The query parameters of a `redis://`, `rediss://` or `unix://` URL go to the Redis client
    as they are: a connection is made of them here (nothing connects), so that a name the client
    does not know or a value it cannot take is reported now, not by every store command. The
    line names the parameter, never its value (nor anything when the query may be part of a
    password, see _names_hosts)."""
    try:
        ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]  # bare in redis-py
    except (TypeError, ValueError, RedisError) as error:
        parts = urlsplit(url)
        named = _NAMED_OPTION.search(str(error))
        if not _names_hosts(url, parts.netloc):
            raise ValueError(f"bad query parameter{_ENCODE_HINT}") from None
        if isinstance(error, TypeError):
            name = f" {named.group(1)!r}" if named else ""
            raise ValueError(f"unknown query parameter{name} (not a Redis client option)") from None
        if named:
            raise ValueError(
                f"query parameter {named.group(1)!r}: a value the Redis client cannot take"
            ) from None
        values = [value for _, value in parse_qsl(parts.query) if len(value) > 2]
        message = str(error).rstrip(".")
        if any(value in message for value in values):
            message = "the Redis client refuses a query parameter's value"
        raise ValueError(message) from None


def parse_store_url(url: str) -> StoreAddress:
    """The sentinels or cluster seeds of a `redis+sentinel://` or `redis+cluster://` URL (and
    their `rediss+` forms); ValueError says what is wrong."""
    parts = urlsplit(url)
    base, _, kind_name = parts.scheme.partition("+")
    if base not in ("redis", "rediss") or kind_name not in ("sentinel", "cluster"):
        raise ValueError(f"unknown scheme {parts.scheme!r}")
    kind: Kind = "sentinel" if kind_name == "sentinel" else "cluster"
    named = _names_hosts(url, parts.netloc)
    if parts.fragment:
        raise ValueError(f"must not have a fragment{'' if named else _ENCODE_HINT}")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    hosts = tuple(
        _host(item, _DEFAULT_PORTS[kind], named=named) for item in hostlist.split(",") if item
    )
    if not hosts:
        raise ValueError(f"names no {'sentinel' if kind == 'sentinel' else 'cluster node'}")
    service_name, db = _path(kind, parts.path)
    options = _options(kind, base == "rediss", parts.query)
    return StoreAddress(
        kind=kind,
        tls=base == "rediss",
        hosts=hosts,
        username=unquote(username) or None,
        password=unquote(password) or None,
        service_name=service_name,
        db=db,
        options=options,
    )


def _names_hosts(url: str, netloc: str) -> bool:
    """Whether the host part of `netloc` can be named in a message: the netloc has the
    credentials' `@`, or the URL has no `@` at all. Otherwise an unencoded `/`, `?` or `#` in a
    password cut the URL short, and what looks like a host or port is part of the password."""
    return "@" in netloc or "@" not in url


def _host(item: str, default_port: int, *, named: bool) -> tuple[str, int]:
    """(host, port) of `host[:port]` or `[IPv6][:port]`; the messages name the host only when
    `named` (see _names_hosts), and never the port's text."""
    host, colon, port = _split_host(item)
    if not host:
        raise ValueError(f"host missing before a ':PORT'{'' if named else _ENCODE_HINT}")
    return host, _port(port, host, named=named) if colon else default_port


def _split_host(item: str) -> tuple[str, str, str]:
    """(host, ':', port) of `host:port` or `[IPv6]:port`; (host, '', '') without a port."""
    host, colon, port = item.rpartition(":") if not item.endswith("]") else ("", "", "")
    if not colon:
        host = item
    return host.removeprefix("[").removesuffix("]"), colon, port


def _port(port: str, host: str, *, named: bool) -> int:
    if port.isascii() and port.isdigit() and 0 < int(port) < 65536:
        return int(port)
    if named and host:
        raise ValueError(f"bad port for host {host!r}: must be a number 1-65535")
    raise ValueError(f"bad port: must be a number 1-65535{_ENCODE_HINT}")


def _path(kind: Kind, path: str) -> tuple[str, int]:
    segments = [unquote(segment) for segment in path.split("/") if segment]
    if kind == "cluster":
        if segments not in ([], ["0"]):
            raise ValueError("a cluster has only database 0: leave the path empty")
        return "", 0
    if not segments:
        raise ValueError("missing the service name: redis+sentinel://HOSTS/SERVICE_NAME[/DB]")
    if len(segments) > 2:
        raise ValueError("path must be /SERVICE_NAME or /SERVICE_NAME/DB")
    if len(segments) == 2 and not segments[1].isdigit():
        raise ValueError(f"database {segments[1]!r} must be a number")
    return segments[0], int(segments[1]) if len(segments) == 2 else 0


def _options(kind: Kind, tls: bool, query: str) -> dict[str, str]:
    allowed = _QUERY[kind] | (_TLS_QUERY if tls else set())
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError("malformed query string") from None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            known = ", ".join(sorted(allowed))
            raise ValueError(f"unknown query parameter {name!r} (known: {known})")
        options[name] = value
    timeout = options.get("socket_timeout")
    if timeout is not None and not _positive(timeout):
        raise ValueError("socket_timeout must be a number of seconds above 0")
    if options.get("ssl_cert_reqs", "required") not in _CERT_REQS:
        raise ValueError("ssl_cert_reqs must be 'required' or 'none'")
    return options


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False
