"""Where the Redis store lives: one server, a master that Sentinel watches, or a Redis Cluster
(the `redis_url` forms of service/config/redis_url.py).

`Topology.connect` makes the client for a URL, and `survey()` reports the nodes the store stands
on (each master's run id and replica count), from which the store derives its epoch, whether to
wait for a replica, and what `/readyz` shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis.asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ClusterError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config.redis_url import Kind, StoreAddress, parse_store_url, scheme_of

RedisClient = redis.asyncio.Redis | RedisCluster

#: What a failed store command raises: RedisError, OSError (socket errors and TimeoutError), and
#: RedisClusterException (a cluster that cannot be reached or mapped).
REDIS_FAILURES = (RedisError, RedisClusterException, OSError)

# Errors after which a cluster's slots are mapped again: a node gone, or the cluster saying
# its map changed or is incomplete.
_NODE_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    RedisClusterException,
    OSError,
)

# Ping before reusing a pooled connection idle this long, so a dead one fails before a command.
_HEALTH_CHECK_SECONDS = 30


@dataclass(frozen=True)
class MasterState:
    """One master the store writes to: its run id and how many replicas follow it."""

    run_id: str
    replicas: int


@dataclass(frozen=True)
class Survey:
    """The store's nodes as last seen: masters by address, and how many nodes are known."""

    kind: Kind
    masters: Mapping[str, MasterState]
    nodes: int

    @property
    def epoch(self) -> str:
        """Changes whenever any master restarts or is replaced (see RedisStore.epoch)."""
        return ",".join(state.run_id for _, state in sorted(self.masters.items()))


class Topology:
    """One server: the client, and what it is made of."""

    kind: Kind = "standalone"

    def __init__(self, client: RedisClient) -> None:
        self.client = client

    @classmethod
    def connect(cls, url: str, *, timeout_seconds: float) -> Topology:
        """The topology `url` names, with a client whose commands time out after
        `timeout_seconds` and are never retried (the caller's policy retries)."""
        common: dict[str, Any] = {
            "socket_timeout": timeout_seconds,
            "socket_connect_timeout": timeout_seconds,
            "retry": Retry(NoBackoff(), 0),
            "health_check_interval": _HEALTH_CHECK_SECONDS,
            "decode_responses": False,
        }
        if "+" not in scheme_of(url):
            return cls(redis.asyncio.Redis.from_url(url, **common))
        address = parse_store_url(url)
        timeout = float(address.options.get("socket_timeout", timeout_seconds))
        common |= {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        tls: dict[str, Any] = {}
        if address.tls:
            tls = {
                "ssl": True,
                "ssl_cert_reqs": address.options.get("ssl_cert_reqs", "required"),
                "ssl_ca_certs": address.options.get("ssl_ca_certs"),
            }
        credentials = {"username": address.username, "password": address.password}
        if address.kind == "cluster":
            return ClusterTopology(address, common | tls | credentials)
        return SentinelTopology(address, common, tls, credentials)

    async def survey(self) -> Survey:
        """The master's run id and replica count (one INFO)."""
        state = _master_state(await self._server().info())
        return Survey(self.kind, {self._endpoint(): state}, 1 + state.replicas)

    @property
    def address(self) -> str:
        """Where the server is: host:port/db or the socket path."""
        kwargs = self._server().connection_pool.connection_kwargs
        if kwargs.get("path"):
            return self._endpoint()
        return f"{self._endpoint()}/{kwargs.get('db', 0)}"

    def _server(self) -> redis.asyncio.Redis:
        assert isinstance(self.client, redis.asyncio.Redis)  # noqa: S101  # one server
        return self.client

    def _endpoint(self) -> str:
        """host:port, or unix:// and the socket path."""
        kwargs = self._server().connection_pool.connection_kwargs
        if kwargs.get("path"):
            return f"unix://{kwargs['path']}"
        return f"{kwargs.get('host')}:{kwargs.get('port')}"

    async def ready(self) -> None:
        """Prepare the client for commands (nothing to do for one server)."""

    async def drop_idle(self) -> None:
        """Close the pooled connections not in use: the store's server restarted or was
        replaced, and a connection opened before that would fail its next command (one that is
        not used within the health-check interval is not pinged first)."""
        if isinstance(self.client, redis.asyncio.Redis):
            await self.client.connection_pool.disconnect(inuse_connections=False)

    async def after_error(self, error: BaseException) -> None:
        """Learn from a failed command (one server: its client reconnects by itself; Sentinel's
        asks the sentinels for the master on every new connection)."""

    def master_of(self, key: str) -> ClusterNode | None:
        """The cluster node that holds `key`; None where there is only one master."""
        del key
        return None

    async def aclose(self) -> None:
        """Close every connection."""
        await self.client.aclose()


class SentinelTopology(Topology):
    """A master found through Sentinel, and found again after every failover."""

    kind: Kind = "sentinel"

    def __init__(
        self,
        address: StoreAddress,
        common: dict[str, Any],
        tls: dict[str, Any],
        credentials: dict[str, Any],
    ) -> None:
        sentinel_credentials = {
            "username": address.options.get("sentinel_username"),
            "password": address.options.get("sentinel_password"),
        }
        sentinel_kwargs = {
            name: value
            for name, value in {**common, **tls, **sentinel_credentials}.items()
            if name not in ("health_check_interval", "decode_responses")
        }
        self.sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it bare
            list(address.hosts), sentinel_kwargs=sentinel_kwargs, **common, **tls, **credentials
        )
        self.service_name = address.service_name
        self._address = (
            f"master {address.service_name!r} of sentinels {address.host_list}, db {address.db}"
        )
        client = self.sentinel.master_for(
            address.service_name, redis_class=redis.asyncio.Redis, db=address.db
        )
        super().__init__(client)

    async def survey(self) -> Survey:
        """The master the sentinels name now, its run id and replica count, and how many nodes
        (master, replicas, sentinels) are known."""
        host, port = await self.sentinel.discover_master(self.service_name)
        state = _master_state(await self._server().info())
        nodes = 1 + state.replicas + len(self.sentinel.sentinels)
        return Survey(self.kind, {f"{_text(host)}:{port}": state}, nodes)

    @property
    def address(self) -> str:
        return self._address

    async def aclose(self) -> None:
        await super().aclose()
        for sentinel in self.sentinel.sentinels:
            await sentinel.aclose()


class ClusterTopology(Topology):
    """A Redis Cluster: keys live on the master of their hash slot."""

    kind: Kind = "cluster"

    def __init__(self, address: StoreAddress, kwargs: dict[str, Any]) -> None:
        seeds = [ClusterNode(host, port) for host, port in address.hosts]
        self._address = f"cluster of {address.host_list}"
        super().__init__(RedisCluster(startup_nodes=seeds, dynamic_startup_nodes=False, **kwargs))

    @property
    def address(self) -> str:
        return self._address

    def _cluster(self) -> RedisCluster:
        assert isinstance(self.client, RedisCluster)  # noqa: S101  # made in __init__
        return self.client

    async def ready(self) -> None:
        """Map the cluster's slots unless they are mapped: redis-py's cluster client, used by
        concurrent commands before that, sends some of them on connections being set up
        (seen as `AttributeError` and `Connection closed by server`), so every command waits
        for the mapping here first (the client serialises it; a no-op once done)."""
        await self._cluster().initialize()

    async def after_error(self, error: BaseException) -> None:
        """After a node failed to answer, map the slots again before the next command: the
        client would otherwise keep sending a dead master's slots to it (its pipelines never
        re-map without retries, and the store allows none). Closing the client is how
        redis-py's own retry does it; the next command reconnects."""
        if isinstance(error, _NODE_ERRORS):
            await self._cluster().aclose()

    async def survey(self) -> Survey:
        """Every master's run id and replica count (INFO on each master), and how many nodes
        the cluster has."""
        cluster = self._cluster()
        replies: dict[str, Any] = await cluster.info(target_nodes=RedisCluster.PRIMARIES)
        masters = {name: _master_state(info) for name, info in replies.items()}
        return Survey(self.kind, masters, len(cluster.get_nodes()))

    def master_of(self, key: str) -> ClusterNode | None:
        cluster = self._cluster()
        return cluster.get_node_from_key(key) if cluster.get_nodes() else None


def _master_state(info: Mapping[str, Any]) -> MasterState:
    return MasterState(str(info.get("run_id", "")), int(info.get("connected_slaves", 0)))


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
