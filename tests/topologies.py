"""Real Redis deployments for tests, made of `redis-server` child processes on free ports of
127.0.0.1 (no mocks):

- `RedisServer`: one server without persistence, restartable on the same port.
- `RedisSentinelSet`: one master, one replica and three sentinels (quorum 2) watching the
  service `mymaster`; a master can be killed, its replacement awaited, and the set restored.
- `RedisClusterSet`: a Redis Cluster of `masters` masters with `replicas_per_master` replicas
  each, made with `redis-cli --cluster create`; nodes can be killed and rejoin.

Every process writes its log to `redis-server.log` (`sentinel.log` for sentinels) in a directory
of its own; the errors these helpers raise on a timeout (`RuntimeError`) end with the tails of
those logs. Failure detection is tuned for failovers that are quick yet reliable on a loaded
CI machine: a cluster node fails after 1 s without answers (`cluster-node-timeout`), a master
watched by sentinels after 2 s (`down-after-milliseconds`; with 1 s, a sentinel often took a
master it had just promoted for down and failed over a second time). The admin commands use
short-lived synchronous `redis.Redis` clients with short timeouts and no retries.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import free_port

_POLL_SECONDS = 0.05
_LOG_TAIL_LINES = 30
_CLIENT_TIMEOUT = 2.0

#: Replication that starts at once and never touches the disk (a replica's data never outlives
#: its process, as a master's does not without persistence).
_REPLICATION_ARGS = (
    *("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"),
    *("--repl-diskless-load", "swapdb", "--repl-ping-replica-period", "1"),
)


class RedisServer:
    """A `redis-server` child process without persistence, restartable on the same port."""

    #: How the server's first reply to a PING may start once it takes commands.
    ready_replies: tuple[bytes, ...] = (b"+PONG",)
    #: The name of its log file, in its directory.
    log_name = "redis-server.log"

    def __init__(self, executable: str, directory: Path) -> None:
        self.port = free_port()
        self.log_path = directory / self.log_name
        self._executable = executable
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The `redis://` URL of the server."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may still be starting)."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15.0, args: Sequence[str] = ()) -> None:
        """Start the server unless it runs, with `args` as extra `redis-server` arguments;
        return once it answers PING. It starts empty unless its directory holds a `dump.rdb`."""
        if self.running:
            return
        self._directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(  # noqa: S603
                self._command_line(args), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not self._answers_ping():
            if not self.running:
                raise RuntimeError(f"redis-server exited on start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer in {timeout}s:\n{self.log_tail()}")
            time.sleep(_POLL_SECONDS)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down (SIGTERM), killing it after `timeout`; its data is lost."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._process.wait()

    def kill(self) -> None:
        """End the server abruptly (SIGKILL), as a crash would."""
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGKILL)
        self._process.wait()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Freeze the process (SIGSTOP) for the block, as a stalled machine would: it keeps
        its connections but answers nothing; it continues (SIGCONT) afterwards."""
        assert self._process is not None
        assert self.running
        self._process.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._process.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        """Delete every key."""
        with redis.Redis(port=self.port, socket_timeout=5.0) as client:
            client.flushall()

    def log_tail(self) -> str:
        """The last lines the server wrote."""
        if not self.log_path.exists():
            return "(no log)"
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-_LOG_TAIL_LINES:])

    def _command_line(self, args: Sequence[str]) -> list[str]:
        return [
            self._executable,
            *("--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(self._directory)),
            *args,
        ]

    def _answers_ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as connection:
                connection.sendall(b"PING\r\n")
                return connection.recv(16).startswith(self.ready_replies)
        except OSError:
            return False


class RedisSentinel(RedisServer):
    """`redis-server <directory>/sentinel.conf --sentinel`, watching one master.

    The sentinel rewrites its configuration file with what it learns (replicas, other
    sentinels, a new master), so a restart keeps that knowledge.
    """

    log_name = "sentinel.log"

    def __init__(
        self,
        executable: str,
        directory: Path,
        service: str,
        master_port: int,
        *,
        quorum: int,
        down_after_milliseconds: int,
    ) -> None:
        super().__init__(executable, directory)
        self.config_path = directory / "sentinel.conf"
        directory.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            "protected-mode no\n"
            f'dir "{directory}"\n'
            f"sentinel monitor {service} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {service} {down_after_milliseconds}\n"
            # Also the pause before this sentinel may try another failover of this master.
            f"sentinel failover-timeout {service} 5000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )

    def _command_line(self, args: Sequence[str]) -> list[str]:
        return [self._executable, str(self.config_path), "--sentinel", *args]


class RedisSentinelSet:
    """One master, one replica and three sentinels (quorum 2) watching the service
    `mymaster`, all on free ports of 127.0.0.1.

    After a failover the master is whichever data node the sentinels promoted. Sentinels
    take a master for down after `down_after_milliseconds` without a valid answer; keep it
    above their 1 s ping period, or they may fail a master over again right after promoting
    it (their link to it can wait up to a second before it reconnects).
    """

    service = "mymaster"

    def __init__(
        self, executable: str, directory: Path, *, down_after_milliseconds: int = 2000
    ) -> None:
        self._nodes = [RedisServer(executable, directory / f"node-{index}") for index in range(2)]
        self._sentinels = [
            RedisSentinel(
                executable,
                directory / f"sentinel-{index}",
                self.service,
                self._nodes[0].port,
                quorum=2,
                down_after_milliseconds=down_after_milliseconds,
            )
            for index in range(3)
        ]

    @property
    def url(self) -> str:
        """`redis+sentinel://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/mymaster/0`."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    @property
    def sentinel_ports(self) -> list[int]:
        """The ports of the three sentinels."""
        return [sentinel.port for sentinel in self._sentinels]

    @property
    def data_ports(self) -> list[int]:
        """The ports of the two data nodes (master and replica, in either order)."""
        return [node.port for node in self._nodes]

    def start(self, timeout: float = 30.0) -> None:
        """Start the data nodes, then the sentinels; return once the set is healthy (see
        `restore`). Everything started is stopped again if that fails."""
        try:
            master, replica = self._nodes
            master.start(args=_REPLICATION_ARGS)
            replica.start(args=[*_REPLICATION_ARGS, "--replicaof", "127.0.0.1", str(master.port)])
            # Sentinels find the replicas in the master's INFO, which they read at once on
            # connecting but then only every ten seconds: the replica must be there first.
            _wait_until(
                lambda: _replica_problem(replica.port, master.port),
                timeout,
                "the replica to sync",
                self._processes(),
            )
            for sentinel in self._sentinels:
                sentinel.start()
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process (sentinels first, so that they do not fail over)."""
        _stop_all([*self._sentinels, *reversed(self._nodes)])

    def master_port(self) -> int:
        """The master's port as the sentinels name it (`SENTINEL get-master-addr-by-name`):
        the first one named that answers `ROLE` as a master, else the first one named."""
        named = self._named_masters()
        if not named:
            raise RuntimeError(f"no sentinel names a master:\n{_log_tails(self._processes())}")
        for port in named.values():
            if _is_master(port):
                return port
        return next(iter(named.values()))

    def kill_master(self) -> int:
        """SIGKILL the current master's process; its port."""
        port = self.master_port()
        self._node(port).kill()
        return port

    def wait_for_promotion(self, old_port: int, timeout: float = 30.0) -> float:
        """Wait until a sentinel names a master other than `old_port` that answers `ROLE` as a
        master; the seconds it took from this call."""

        def problem() -> str | None:
            named = self._named_masters()
            if any(port != old_port and _is_master(port) for port in named.values()):
                return None
            return f"the sentinels name {named}"

        return _wait_until(problem, timeout, "a new master", self._processes())

    def restore(self, timeout: float = 30.0) -> None:
        """Restart every process that is down on its port, the data nodes as replicas of the
        current master (waiting first for a promotion if the master is down while its replica
        runs); return once the set is healthy: every sentinel names the same master, which
        answers as a master, flags it as just `master` (no failover going on) and knows the two
        other sentinels and the other data node as a replica, and that replica's link to the
        master is up."""
        for sentinel in self._sentinels:
            sentinel.start()
        if not all(node.running for node in self._nodes):
            master_port = self.master_port()
            master = self._node(master_port)
            if not master.running:
                if any(node.running for node in self._nodes):
                    self.wait_for_promotion(master_port, timeout)
                    master_port = self.master_port()
                else:
                    master.start(args=_REPLICATION_ARGS)
            for node in self._nodes:
                node.start(args=[*_REPLICATION_ARGS, "--replicaof", "127.0.0.1", str(master_port)])
        self._wait_healthy(timeout)

    def flush(self) -> None:
        """FLUSHALL on the current master, then WAIT until the replica has done it too."""
        with _client(self.master_port()) as client:
            client.flushall()
            acknowledged = int(client.execute_command("WAIT", 1, 5000))
        if acknowledged < 1:
            raise RuntimeError(
                f"the replica did not acknowledge FLUSHALL:\n{_log_tails(self._processes())}"
            )

    def _wait_healthy(self, timeout: float) -> None:
        _wait_until(self._health_problem, timeout, "a healthy sentinel set", self._processes())

    def _health_problem(self) -> str | None:
        named = self._named_masters()
        if len(named) < len(self._sentinels) or len(set(named.values())) != 1:
            return f"the sentinels name {named}"
        master_port = next(iter(named.values()))
        if master_port not in self.data_ports or not _is_master(master_port):
            return f"the named master {master_port} is not a running master"
        replica_ports = [port for port in self.data_ports if port != master_port]
        return _first_problem(
            chain(
                (
                    self._sentinel_problem(sentinel.port, replica_ports)
                    for sentinel in self._sentinels
                ),
                (_replica_problem(port, master_port) for port in replica_ports),
            )
        )

    def _sentinel_problem(self, port: int, replica_ports: list[int]) -> str | None:
        """Why the sentinel on `port` does not see a healthy set (yet)."""
        state = _pairs(_call(port, "SENTINEL", "MASTER", self.service))
        if state["flags"] != "master":
            return f"sentinel {port} flags the master {state['flags']}"
        if int(state["num-other-sentinels"]) != len(self._sentinels) - 1:
            return f"sentinel {port} knows {state['num-other-sentinels']} other sentinels"
        if int(state["num-slaves"]) != len(replica_ports):
            return f"sentinel {port} knows {state['num-slaves']} replicas"
        replicas = {
            int(replica["port"]): replica["flags"]
            for replica in map(_pairs, _call(port, "SENTINEL", "REPLICAS", self.service))
        }
        if any(replicas.get(replica_port) != "slave" for replica_port in replica_ports):
            return f"sentinel {port} sees the replicas as {replicas}"
        others = [
            _pairs(other)["flags"] for other in _call(port, "SENTINEL", "SENTINELS", self.service)
        ]
        # `master_down` is what another sentinel last said of a master (for up to 5 s after a
        # failover), not a problem of that sentinel.
        if any(set(flags.split(",")) - {"sentinel", "master_down"} for flags in others):
            return f"sentinel {port} flags the other sentinels {others}"
        return None

    def _named_masters(self) -> dict[int, int]:
        """The master's port by the port of each running sentinel that answers."""
        named: dict[int, int] = {}
        for sentinel in self._sentinels:
            if not sentinel.running:
                continue
            try:
                address = _call(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
            except (redis.RedisError, OSError):
                continue
            if address:
                named[sentinel.port] = int(address[1])
        return named

    def replica(self) -> RedisServer:
        """The data node that is not the master now."""
        master = self.master_port()
        return next(node for node in self._nodes if node.port != master)

    def _node(self, port: int) -> RedisServer:
        for node in self._nodes:
            if node.port == port:
                return node
        raise RuntimeError(f"{port} is not a data node of this set ({self.data_ports})")

    def _processes(self) -> list[RedisServer]:
        return [*self._nodes, *self._sentinels]


class RedisClusterSet:
    """A Redis Cluster of `masters` masters with `replicas_per_master` replicas each, on free
    ports of 127.0.0.1, made with `redis-cli --cluster create`.

    Each node keeps its `nodes.conf` in its directory, so a killed node restarted on its ports
    rejoins the cluster (as a replica, if its slots were handed over meanwhile).
    """

    def __init__(
        self,
        executable: str,
        cli: str,
        directory: Path,
        *,
        masters: int = 3,
        replicas_per_master: int = 0,
    ) -> None:
        self.replicas_per_master = replicas_per_master
        self._cli = cli
        count = masters * (1 + replicas_per_master)
        self._nodes = [
            RedisServer(executable, directory / f"node-{index}") for index in range(count)
        ]
        # The cluster bus port is port + 10000 unless set, which may be taken or above 65535.
        self._bus_ports = [free_port() for _ in self._nodes]
        self._killed_slots: dict[int, set[int]] = {}

    @property
    def url(self) -> str:
        """`redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`: three nodes as seeds."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:3])

    @property
    def ports(self) -> list[int]:
        """The ports of every node, masters and replicas."""
        return [node.port for node in self._nodes]

    def start(self, timeout: float = 60.0) -> None:
        """Start the nodes and create the cluster; return once it is healthy (see `restore`).
        Everything started is stopped again if that fails."""
        try:
            for node, bus_port in zip(self._nodes, self._bus_ports, strict=True):
                node.start(args=self._node_args(bus_port))
            command = [
                self._cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                *("--cluster-replicas", str(self.replicas_per_master), "--cluster-yes"),
            ]
            created = subprocess.run(  # noqa: S603
                command, capture_output=True, text=True, timeout=timeout, check=False
            )
            if created.returncode != 0:
                raise RuntimeError(
                    f"redis-cli --cluster create failed ({created.returncode}):\n"
                    f"{created.stdout}\n{created.stderr}\n{_log_tails(self._nodes)}"
                )
            self._wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node."""
        _stop_all(self._nodes)

    def master_ports(self) -> list[int]:
        """The ports of the masters serving slots, as a running node sees them."""
        return sorted(self._slot_map(self._any_running_port()))

    def port_for_key(self, key: str) -> int:
        """The port of the master serving the slot of `key` (`CLUSTER KEYSLOT`)."""
        port = self._any_running_port()
        slot = int(_call(port, "CLUSTER", "KEYSLOT", key))
        for master, slots in self._slot_map(port).items():
            if slot in slots:
                return master
        raise RuntimeError(f"no master serves slot {slot} (of {key!r})")

    def kill_node(self, port: int) -> None:
        """SIGKILL the node on `port` (after noting which slots it served)."""
        node = self._node(port)
        survivors = [other.port for other in self._nodes if other.running and other is not node]
        if survivors:
            self._killed_slots[port] = self._slot_map(survivors[0]).get(port, set())
        node.kill()

    def wait_for_promotion(self, old_port: int, timeout: float = 30.0) -> float:
        """Wait until every running node says `cluster_state:ok` and serves the slots the
        node on `old_port` served when killed from another running master; the seconds it
        took from this call."""
        slots = self._killed_slots.get(old_port, set())

        def problem() -> str | None:
            running = {node.port for node in self._nodes if node.running}
            for port in sorted(running):
                state = _cluster_info(port)["cluster_state"]
                if state != "ok":
                    return f"node {port} says cluster_state:{state}"
                served = set().union(
                    *(owned for master, owned in self._slot_map(port).items() if master in running)
                )
                if not slots <= served:
                    return f"node {port} has no running master for {len(slots - served)} slots"
            return None

        return _wait_until(problem, timeout, "the slots to be served again", self._nodes)

    def restore(self, timeout: float = 60.0) -> None:
        """Restart every node that is down on its ports, with its `nodes.conf`; return once
        the cluster is healthy: every node says `cluster_state:ok`, knows every other node as
        connected and not failing, and sees the same masters serving the same slots, each
        master has `replicas_per_master` replicas, and their links are up."""
        for node, bus_port in zip(self._nodes, self._bus_ports, strict=True):
            node.start(args=self._node_args(bus_port))
        self._wait_healthy(timeout)

    def flush(self) -> None:
        """FLUSHALL on every master (waiting until its replicas have done it too)."""
        for port in self.master_ports():
            with _client(port) as client:
                client.flushall()
                if self.replicas_per_master:
                    acknowledged = int(
                        client.execute_command("WAIT", self.replicas_per_master, 5000)
                    )
                    if acknowledged < self.replicas_per_master:
                        raise RuntimeError(
                            f"the replicas of {port} did not acknowledge FLUSHALL:\n"
                            f"{_log_tails(self._nodes)}"
                        )

    def _node_args(self, bus_port: int) -> list[str]:
        return [
            *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
            *("--cluster-port", str(bus_port), "--cluster-node-timeout", "1000"),
            # Any replica may take over, whenever it last heard from its master.
            *("--cluster-replica-validity-factor", "0"),
            # Replicas stay with their masters: the shape of the cluster does not drift.
            *("--cluster-allow-replica-migration", "no"),
            *_REPLICATION_ARGS,
        ]

    def _wait_healthy(self, timeout: float) -> None:
        _wait_until(self._health_problem, timeout, "a healthy cluster", self._nodes)

    def _health_problem(self) -> str | None:
        stopped = [node.port for node in self._nodes if not node.running]
        if stopped:
            return f"nodes {stopped} are not running"
        return _first_problem(
            chain((self._node_problem(port) for port in self.ports), (self._links_problem(),))
        )

    def _node_problem(self, port: int) -> str | None:
        """Why the node on `port` does not see a healthy cluster (yet)."""
        info = _cluster_info(port)
        if info["cluster_state"] != "ok":
            return f"node {port} says cluster_state:{info['cluster_state']}"
        if int(info["cluster_known_nodes"]) != len(self._nodes):
            return f"node {port} knows {info['cluster_known_nodes']} nodes"
        entries = _cluster_nodes(port)
        for entry in entries:
            if entry.flags & {"fail", "fail?", "handshake", "noaddr"} or not entry.connected:
                return f"node {port} sees {entry.port} as {entry.line!r}"
        ids = {entry.node_id: entry.port for entry in entries}
        replicas = Counter(ids.get(entry.master_id) for entry in entries if entry.is_replica)
        masters = [entry.port for entry in entries if entry.slots]
        if any(replicas[master] != self.replicas_per_master for master in masters):
            return f"node {port} sees masters {masters} with replicas {dict(replicas)}"
        return None

    def _links_problem(self) -> str | None:
        """Why the nodes disagree on the slot map, or a replica's link is not up (yet)."""
        slot_maps = [self._slot_map(port) for port in self.ports]
        if any(slot_map != slot_maps[0] for slot_map in slot_maps):
            return "the nodes disagree on which masters serve which slots"
        entries = _cluster_nodes(self.ports[0])
        ids = {entry.node_id: entry.port for entry in entries}
        return _first_problem(
            _replica_problem(entry.port, ids.get(entry.master_id, 0))
            for entry in entries
            if entry.is_replica
        )

    def _slot_map(self, port: int) -> dict[int, set[int]]:
        """The slots of each master (by port) that serves any, as the node on `port` sees it."""
        return {entry.port: entry.slots for entry in _cluster_nodes(port) if entry.slots}

    def _any_running_port(self) -> int:
        for node in self._nodes:
            if node.running:
                return node.port
        raise RuntimeError("no node of the cluster runs")

    def _node(self, port: int) -> RedisServer:
        for node in self._nodes:
            if node.port == port:
                return node
        raise RuntimeError(f"{port} is not a node of this cluster ({self.ports})")


class _ClusterNode:
    """One line of `CLUSTER NODES`."""

    def __init__(self, line: str) -> None:
        fields = line.split()
        self.line = line
        self.node_id = fields[0]
        self.port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        self.flags = set(fields[2].split(","))
        self.master_id = fields[3]
        self.connected = fields[7] == "connected"
        self.is_replica = "slave" in self.flags
        self.slots: set[int] = set()
        for item in fields[8:]:
            if item.startswith("["):  # a slot being imported or migrated
                continue
            first, _, last = item.partition("-")
            self.slots.update(range(int(first), int(last or first) + 1))


def _client(port: int) -> redis.Redis:
    return redis.Redis(
        port=port,
        socket_timeout=_CLIENT_TIMEOUT,
        socket_connect_timeout=_CLIENT_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
        decode_responses=True,
        protocol=2,  # flat [field, value, ...] replies (RESP3 makes maps of some)
    )


def _call(port: int, *args: str | int) -> Any:
    """One command to the server on `port`; its reply (decoded, not parsed by redis-py)."""
    with _client(port) as client:
        return client.execute_command(*args)


def _pairs(reply: Sequence[str]) -> dict[str, str]:
    """A flat `[field, value, ...]` reply as a dict."""
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _is_master(port: int) -> bool:
    try:
        return bool(_call(port, "ROLE")[0] == "master")
    except (redis.RedisError, OSError):
        return False


def _info_fields(text: str) -> dict[str, str]:
    fields = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {name: value.strip() for name, value in fields}


def _cluster_info(port: int) -> dict[str, str]:
    return _info_fields(str(_call(port, "CLUSTER", "INFO")))


def _cluster_nodes(port: int) -> list[_ClusterNode]:
    return [_ClusterNode(line) for line in str(_call(port, "CLUSTER", "NODES")).splitlines()]


def _replica_problem(port: int, master_port: int) -> str | None:
    """Why the server on `port` is not (yet) a replica of `master_port` with its link up."""
    with _client(port) as client:
        # redis-py parses INFO into a dict (with numbers as ints).
        info = {name: str(value) for name, value in client.info("replication").items()}
    actual = (info.get("role"), info.get("master_port"), info.get("master_link_status"))
    if actual != ("slave", str(master_port), "up"):
        return f"replica {port}: role, master port, link = {actual}"
    return None


def _first_problem(problems: Iterable[str | None]) -> str | None:
    """The first problem of `problems` (checked lazily, in order), or None."""
    return next((problem for problem in problems if problem is not None), None)


def _wait_until(
    problem: Callable[[], str | None],
    timeout: float,
    what: str,
    processes: Iterable[RedisServer],
) -> float:
    """Poll `problem` until it returns None; the seconds it took. It raises `RuntimeError` (with
    the last problem and the log tails of `processes`) after `timeout` seconds; Redis and
    socket errors count as problems."""
    start = time.monotonic()
    while True:
        try:
            last = problem()
        except (redis.RedisError, OSError) as error:
            last = f"{type(error).__name__}: {error}"
        elapsed = time.monotonic() - start
        if last is None:
            return elapsed
        if elapsed > timeout:
            raise RuntimeError(
                f"waited {timeout}s for {what}; last: {last}\n{_log_tails(processes)}"
            )
        time.sleep(_POLL_SECONDS)


def _log_tails(processes: Iterable[RedisServer]) -> str:
    return "\n".join(
        f"--- {process.log_path} (port {process.port}):\n{process.log_tail()}"
        for process in processes
    )


def _stop_all(processes: Iterable[RedisServer]) -> None:
    """Stop each process, even when stopping another one fails; re-raise the first error."""
    errors: list[BaseException] = []
    for process in processes:
        try:
            process.stop()
        except BaseException as error:
            errors.append(error)
    if errors:
        raise errors[0]
