"""The broker's benchmark: one invocation, every figure (see docs/performance.md).

Starts its own redis-server (free port), the Monogoto simulator, the broker (`monogoto-broker
serve --workers 1`), a bare Litestar app and a broker without its local cache, all under the same
server with one worker, and drives them alternately with `wrk`; the broker once with its caller
key and once with a Kubernetes ServiceAccount token (the issuer's keys served from this process).
Then measures the RSS of that replica (100 accounts), how fast three replicas converge after an
invalidation, and how many upstream calls each account costs per refresh cycle.

    .venv/bin/python bench/run.py [--rounds 3] [--seconds 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.broker.runtime import open_store  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.keys import new_api_key, new_encryption_key  # noqa: E402
from service.simulator.client import SimulatorControl  # noqa: E402
from service.simulator.process import SimulatorProcess, terminate  # noqa: E402
from tests.service_account_issuer import AUDIENCE, IssuerServer, SigningKey, claims, sign  # noqa: E402

ACCOUNTS = 100
BENCH_ACCOUNT = "acct-000"
PASSWORD = "bench-password"  # noqa: S105 (a throwaway simulator user)
SERVER_CPU = "0"  # the server under test gets a core of its own ...
CLIENT_CPU = "1"  # ... wrk, Redis and the simulator share the other
CONVERGENCE_TRIALS = 5
CYCLE_LIFETIME_SECONDS = 20
CYCLE_WINDOW_SECONDS = 65
CYCLE_FRACTION = 0.75  # refresh.fraction: a token is renewed after 75 % of its lifetime
_BENCH_LINE = re.compile(r"BENCH (.*)")
CALLER_KEY, CALLER_DIGEST = new_api_key()
CALLER_HEADERS = {"Authorization": f"Bearer {CALLER_KEY}"}
# The ServiceAccount variant: a caller known by its ServiceAccount, with a projected token.
SERVICE_ACCOUNT = ("bench", "bench-caller")
API_KEY_TARGET = "broker (uvicorn)"
SERVICE_ACCOUNT_TARGET = "sa-token (uvicorn)"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pinned(cpu: str, command: list[str]) -> list[str]:
    """`command` restricted to `cpu` when taskset exists (else unpinned)."""
    return ["taskset", "-c", cpu, *command] if shutil.which("taskset") else command


@dataclass
class Server:
    """A child process serving HTTP on 127.0.0.1:port."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    credential: str = CALLER_KEY  # what wrk sends as the bearer

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def wait(self, path: str, timeout: float = 120.0) -> None:
        """Poll `path` until it answers 200."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0, headers=CALLER_HEADERS) as http:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited:\n{self.log_path.read_text()[-3000:]}")
                try:
                    if http.get(path).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: {path} never answered 200")
                time.sleep(0.1)

    def rss_bytes(self) -> int:
        """Resident memory of the process and its children."""
        process = psutil.Process(self.process.pid)
        tree = [process, *process.children(recursive=True)]
        # taskset execs the command, so the Popen pid is the server itself.
        return sum(p.memory_info().rss for p in tree)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the process and its children."""
        process = psutil.Process(self.process.pid)
        return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 30 s."""
        terminate(self.process, 30.0)


def start_server(
    name: str, command: list[str], directory: Path, port: int, env: dict[str, str]
) -> Server:
    """Start `command` pinned to the server core, its output in `directory/name.log`."""
    log_path = directory / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603
            pinned(SERVER_CPU, command), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    return Server(name, process, port, log_path)


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A private redis-server without persistence on a free port; yields its URL."""
    executable = shutil.which("redis-server")
    if executable is None:
        sys.exit("redis-server is not installed: apt-get install redis-server")
    port = free_port()
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(directory)]
    with (directory / "redis.log").open("wb") as log:
        process = subprocess.Popen(pinned(CLIENT_CPU, command), stdout=log, stderr=log)  # noqa: S603
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                    connection.sendall(b"PING\r\n")
                    if connection.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        terminate(process, 10)


def account_name(index: int) -> str:
    """The name of the bench's account `index`."""
    return f"acct-{index:03d}"


def user_name(index: int) -> str:
    """The simulator user account `index` logs in as."""
    return f"user{index:03d}@bench.example"


def write_users(directory: Path, count: int) -> Path:
    """The simulator's users file: one user per account, `count` of them."""
    path = directory / "users.yaml"
    path.write_text(yaml.safe_dump({user_name(i): PASSWORD for i in range(count)}), "utf-8")
    return path


def write_config(
    directory: Path,
    name: str,
    redis_url: str,
    simulator_url: str,
    *,
    accounts: int = ACCOUNTS,
    auth_rate: tuple[int, float] = (1000, 1),
    refresh: dict[str, float] | None = None,
    **extra: Any,
) -> Path:
    """A broker config with `accounts` accounts (dialects alternate), an auth budget of
    `auth_rate` (limit, period), the `refresh` settings over the bench's, and one caller for all
    (and, with `caller_auth` in `extra`, a second known by its ServiceAccount)."""
    configured = {
        account_name(i): {
            "username": user_name(i),
            "password": PASSWORD,
            "dialect": "v1" if i % 2 else "legacy",
        }
        for i in range(accounts)
    }
    limit, period = auth_rate
    config = {
        "redis_url": redis_url,
        "encryption_keys_file": str(directory / "keys"),
        "upstream": {
            "base_url": simulator_url,
            # By default the simulator's limit is raised to match: the bench measures the broker,
            # not 429s.
            "auth_rate": {"limit": limit, "period_seconds": period},
        },
        "refresh": {"fraction": CYCLE_FRACTION, "min_remaining_seconds": 5, **(refresh or {})},
        "accounts": configured,
        "callers": {"bench": {"api_key_sha256": CALLER_DIGEST, "accounts": ["*"]}},
        **extra,
    }
    if "caller_auth" in extra:
        config["callers"]["bench-sa"] = {
            "service_accounts": ["/".join(SERVICE_ACCOUNT)],
            "accounts": ["*"],
        }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@dataclass
class Run:
    """One wrk run's figures."""

    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: float = 0.0  # server CPU time (user + system) per request


def drive(url: str, seconds: int, connections: int, credential: str = CALLER_KEY) -> Run:
    """wrk with one thread on the client core against the token route of `url`, sending
    `credential` as the bearer."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    command += ["-s", str(ROOT / "bench" / "token.lua"), f"{url}/v1/accounts/{BENCH_ACCOUNT}/token"]
    env = os.environ | {"BENCH_CALLER_KEY": credential}
    output = subprocess.run(  # noqa: S603
        pinned(CLIENT_CPU, command), capture_output=True, text=True, env=env, check=True
    ).stdout
    found = _BENCH_LINE.search(output)
    if found is None:
        raise RuntimeError(f"wrk printed no BENCH line:\n{output}")
    fields = {k: int(v) for k, v in (pair.split("=") for pair in found.group(1).split())}
    return Run(
        rps=fields["requests"] / (fields["duration_us"] / 1e6),
        p50_ms=fields["p50_us"] / 1000,
        p99_ms=fields["p99_us"] / 1000,
        errors=fields["socket_errors"] + fields["non2xx"],
    )


def median_run(runs: list[Run]) -> Run:
    """Per-figure medians."""
    return Run(
        rps=statistics.median(r.rps for r in runs),
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        errors=sum(r.errors for r in runs),
        cpu_us=statistics.median(r.cpu_us for r in runs),
    )


def child_env(**extra: str) -> dict[str, str]:
    """The environment of the servers: no BROKER_* overrides, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["PYTHONPATH"] = str(ROOT)
    return env | extra


def start_replicas(names: list[str], config: Path, directory: Path, stopping: Any) -> list[Server]:
    """One `serve` replica of `config` per name, each stopped with the run; once all are ready."""
    replicas = []
    for name in names:
        port = free_port()
        command = serve_command(config, port)
        replicas.append(stopping(start_server(name, command, directory, port, child_env())))
    for replica in replicas:
        replica.wait("/readyz")
    return replicas


def serve_command(config: Path, port: int) -> list[str]:
    """The production command: `monogoto-broker serve --workers 1`."""
    return [
        *(sys.executable, "-m", "service.cli", "serve", "--config", str(config)),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]


def launch_command(server: str, factory: str, port: int) -> list[str]:
    """One of bench/apps.py's apps (or the broker's factory) under `server`."""
    return [sys.executable, str(ROOT / "bench" / "launch.py"), server, factory, str(port)]


def throughput(args: argparse.Namespace, targets: dict[str, Server]) -> dict[str, Run]:
    """Alternating wrk rounds over every target; per-target medians."""
    for server in targets.values():
        drive(server.url, 2, args.connections, server.credential)  # warm-up
    runs: dict[str, list[Run]] = {name: [] for name in targets}
    for round_number in range(1, args.rounds + 1):
        for name, server in targets.items():
            cpu = server.cpu_seconds()
            run = drive(server.url, args.seconds, args.connections, server.credential)
            run.cpu_us = (server.cpu_seconds() - cpu) / (run.rps * args.seconds) * 1e6
            runs[name].append(run)
            print(
                f"  round {round_number} {name:<22} {run.rps:9.0f} req/s  "
                f"p50 {run.p50_ms:6.2f} ms  p99 {run.p99_ms:6.2f} ms  "
                f"CPU {run.cpu_us:5.0f} us/req  errors {run.errors}",
                flush=True,
            )
    return {name: median_run(r) for name, r in runs.items()}


def token_of(url: str, account: str = BENCH_ACCOUNT) -> str:
    """The access token `url` serves now."""
    answer = httpx.get(
        f"{url}/v1/accounts/{account}/token",
        headers=CALLER_HEADERS,
        timeout=10,
    )
    answer.raise_for_status()
    return str(answer.json()["access_token"])


def convergence(replicas: list[Server]) -> list[float]:
    """Seconds until every other replica serves the token one replica just obtained."""
    first, others = replicas[0], replicas[1:]
    results = []
    clients = [httpx.Client(base_url=r.url, timeout=10, headers=CALLER_HEADERS) for r in others]
    path = f"/v1/accounts/{BENCH_ACCOUNT}/token"
    try:
        for _ in range(CONVERGENCE_TRIALS):
            old = token_of(first.url)
            answer = httpx.post(
                f"{first.url}{path}/invalidate", json={"access_token": old}, headers=CALLER_HEADERS
            )
            answer.raise_for_status()
            new = answer.json()["access_token"]
            written = time.monotonic()
            pending = set(range(len(clients)))
            while pending:
                for index in list(pending):
                    if clients[index].get(path).json()["access_token"] == new:
                        pending.discard(index)
                if time.monotonic() - written > 30:
                    raise RuntimeError("replicas did not converge in 30 s")
            results.append(time.monotonic() - written)
            time.sleep(0.5)
    finally:
        for client in clients:
            client.close()
    return results


def store_versions(config: Path) -> dict[str, int]:
    """Every account's record version in Redis (one increment per token obtained)."""
    settings = load_settings(config)

    async def read() -> dict[str, int]:
        store = open_store(settings)
        try:
            return await store.versions(list(settings.accounts))
        finally:
            await store.close()

    return asyncio.run(read())


def calls_by_user(control: SimulatorControl) -> dict[str, int]:
    """Every auth call per simulator user (login or refresh, any outcome)."""
    counts: dict[str, int] = {}
    for row in control.stats()["calls"]:
        counts[row["user"]] = counts.get(row["user"], 0) + row["count"]
    return counts


def main() -> int:
    """Run the benchmark and print its report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--servers",
        default="uvicorn",
        help="comma-separated: also serve the broker and the bare app under granian",
    )
    parser.add_argument(
        "--profile", action="store_true", help="only profile the broker's hot path (pyinstrument)"
    )
    parser.add_argument("--skip-fleet", action="store_true", help="throughput and RSS only")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    directory = Path(tempfile.mkdtemp(prefix="monogoto-broker-bench-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        return run(args, directory, stack)


def variants(
    servers: list[str], directory: Path, env: dict[str, str], stopping: Any
) -> dict[str, Server]:
    """The bare app under each server, the broker under the others, and the bench variants."""
    targets = {}
    for server in servers:
        for label, factory in [
            ("bare", "bench.apps:create_bare_app"),
            ("floor", "bench.apps:create_floor_app"),
            ("uncached", "bench.apps:create_uncached_app"),
            ("logged", "bench.apps:create_logged_app"),
            ("broker", "service.api.app:create_app_from_env"),
        ]:
            if label == "broker" and server == "uvicorn":
                continue
            if label in {"floor", "uncached", "logged"} and server != "uvicorn":
                continue
            port = free_port()
            name = f"{label} ({server})"
            command = launch_command(server, factory, port)
            targets[name] = stopping(start_server(label + server, command, directory, port, env))
    return targets


def run(args: argparse.Namespace, directory: Path, stack: ExitStack) -> int:
    """Everything, in order; servers stop when `stack` closes."""
    (directory / "keys").write_text(new_encryption_key() + "\n", encoding="utf-8")
    write_users(directory, ACCOUNTS)
    redis_url = stack.enter_context(redis_server(directory))
    simulator = SimulatorProcess.start(
        *("--users", str(directory / "users.yaml"), "--rate-limit", "100000"),
        *("--rate-period", "1"),
        log_path=directory / "simulator.log",
    )
    stack.callback(simulator.stop)
    os.sched_setaffinity(simulator.process.pid, {int(CLIENT_CPU)})
    control = stack.enter_context(SimulatorControl(simulator.url))
    signing_key = SigningKey.rsa("bench-rsa")
    issuer = IssuerServer([signing_key]).start()
    stack.callback(issuer.stop)
    kubernetes = {"issuer": issuer.url, "audiences": [AUDIENCE], "jwks_url": issuer.jwks_url}
    config = write_config(
        directory, "broker", redis_url, simulator.url, caller_auth={"kubernetes": kubernetes}
    )
    # Valid for the whole run; the broker verifies it once and then takes it from its cache.
    service_account_token = sign(signing_key, claims(issuer.url, *SERVICE_ACCOUNT, lifetime=7200))

    def stopping(server: Server) -> Server:
        stack.callback(server.stop)
        return server

    print(_machine(), flush=True)
    if args.profile:
        return profile(args, directory, config)
    [broker] = start_replicas(["broker"], config, directory, stopping)
    body_bytes = len(
        httpx.get(
            f"{broker.url}/v1/accounts/{BENCH_ACCOUNT}/token",
            headers=CALLER_HEADERS,
        ).content
    )
    env = child_env(BENCH_BODY_BYTES=str(body_bytes), BROKER_CONFIG=str(config))
    servers = args.servers.split(",")
    others = variants(servers, directory, env, stopping)
    for server in others.values():
        server.wait(f"/v1/accounts/{BENCH_ACCOUNT}/token")
    targets = {
        API_KEY_TARGET: broker,
        # The same process, driven with the ServiceAccount token instead of the key.
        SERVICE_ACCOUNT_TARGET: dataclasses.replace(broker, credential=service_account_token),
        **others,
    }
    print(
        f"\nthroughput: GET /v1/accounts/{BENCH_ACCOUNT}/token, {body_bytes}-byte body, "
        f"wrk -t1 -c{args.connections} -d{args.seconds}s, {args.rounds} alternating rounds",
        flush=True,
    )
    medians = throughput(args, targets)
    print("\nmedians:")
    for name, m in medians.items():
        print(
            f"  {name:<22} {m.rps:9.0f} req/s  p50 {m.p50_ms:6.2f} ms  p99 {m.p99_ms:6.2f} ms  "
            f"CPU {m.cpu_us:5.0f} us/req  errors {m.errors}"
        )
    print("\nratios against the bare app under the same server:")
    for server in servers:
        bare = medians[f"bare ({server})"]
        for name, m in medians.items():
            if name.endswith(f"({server})") and not name.startswith("bare"):
                print(
                    f"  {name:<22} throughput {m.rps / bare.rps:5.2f} x bare   "
                    f"p99 {m.p99_ms / bare.p99_ms:5.2f} x bare   "
                    f"CPU per request {m.cpu_us / bare.cpu_us:5.2f} x bare"
                )
    floor, ours = medians["floor (uvicorn)"], medians["broker (uvicorn)"]
    print(
        "  broker (uvicorn) against the floor (pre-built response, no parameters): "
        f"throughput {ours.rps / floor.rps:5.2f} x, "
        f"CPU per request {ours.cpu_us / floor.cpu_us:5.2f} x"
    )
    key, token = medians[API_KEY_TARGET], medians[SERVICE_ACCOUNT_TARGET]
    print(
        "  broker with a ServiceAccount token against the caller key: "
        f"throughput {token.rps / key.rps:5.2f} x, "
        f"CPU per request {token.cpu_us / key.cpu_us:5.2f} x "
        f"({token.cpu_us - key.cpu_us:+.0f} us/req)"
    )
    if "granian" in servers:
        best = medians["bare (granian)"].rps / medians["bare (uvicorn)"].rps
        full = medians["broker (granian)"].rps / medians["broker (uvicorn)"].rps
        print(f"  granian / uvicorn: bare {best:5.2f} x, broker {full:5.2f} x")
    for server in targets.values():
        if server.process is not broker.process:
            server.stop()
    print(f"\nRSS of one replica serving {ACCOUNTS} accounts: {broker.rss_bytes() / 2**20:.1f} MiB")
    if args.skip_fleet:
        return 0
    fleet(
        directory=directory,
        broker=broker,
        config=config,
        redis_url=redis_url,
        simulator_url=simulator.url,
        control=control,
        stopping=stopping,
    )
    return 0


def fleet(
    *,
    directory: Path,
    broker: Server,
    config: Path,
    redis_url: str,
    simulator_url: str,
    control: SimulatorControl,
    stopping: Any,
) -> None:
    """Convergence across three replicas, then upstream calls per account per refresh cycle."""
    replicas = [broker, *start_replicas(["replica2", "replica3"], config, directory, stopping)]
    seconds = convergence(replicas)
    print(
        f"\nconvergence after an invalidate on one of 3 replicas ({CONVERGENCE_TRIALS} trials): "
        f"median {statistics.median(seconds) * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms"
    )
    for replica in replicas:
        replica.stop()
    refresh_cycles(
        directory=directory,
        redis_url=redis_url,
        simulator_url=simulator_url,
        control=control,
        stopping=stopping,
    )


def refresh_cycles(
    *,
    directory: Path,
    redis_url: str,
    simulator_url: str,
    control: SimulatorControl,
    stopping: Any,
) -> None:
    """Three replicas, short token lifetimes: upstream calls against new tokens served."""
    control.set(token_lifetime_seconds=CYCLE_LIFETIME_SECONDS)
    cycles = write_config(directory, "cycles", redis_url, simulator_url, key_prefix="cycles")
    replicas = start_replicas(["cycles1", "cycles2", "cycles3"], cycles, directory, stopping)
    # Every account has its first token once each has a record version.
    deadline = time.monotonic() + 60
    while min(store_versions(cycles).values(), default=0) < 1:
        if time.monotonic() > deadline:
            raise RuntimeError("not every account got a first token")
        time.sleep(0.5)
    # A renewal is a new token that callers get: sample every account's token through the
    # replicas in turn and count the distinct ones (record versions also move when a refresh
    # token is noted as spent, so they are not a renewal count).
    names = [f"acct-{i:03d}" for i in range(ACCOUNTS)]
    clients = [httpx.Client(base_url=r.url, timeout=60, headers=CALLER_HEADERS) for r in replicas]
    latencies: list[float] = []

    def tokens_now(turn: int) -> dict[str, str]:
        client = clients[turn % len(clients)]
        tokens = {}
        for name in names:
            started = time.monotonic()
            tokens[name] = client.get(f"/v1/accounts/{name}/token").json()["access_token"]
            latencies.append(time.monotonic() - started)
        return tokens

    try:
        before_calls, seen = calls_by_user(control), tokens_now(0)
        distinct = {name: {token} for name, token in seen.items()}
        window_start = time.monotonic()
        turn = 0
        while time.monotonic() - window_start < CYCLE_WINDOW_SECONDS:
            time.sleep(0.5)
            turn += 1
            for name, token in tokens_now(turn).items():
                distinct[name].add(token)
        after_calls = calls_by_user(control)
        observed = time.monotonic() - window_start
    finally:
        for client in clients:
            client.close()
    per_account = []
    for i, name in enumerate(names):
        user = f"user{i:03d}@bench.example"
        calls = after_calls.get(user, 0) - before_calls.get(user, 0)
        per_account.append((calls, len(distinct[name]) - 1))
    total_calls = sum(c for c, _ in per_account)
    total_renewals = sum(r for _, r in per_account)
    odd = sum(1 for c, r in per_account if c != r)
    cycle = CYCLE_FRACTION * CYCLE_LIFETIME_SECONDS
    print(
        f"\nrefresh cycles: 3 replicas, {ACCOUNTS} accounts, token lifetime "
        f"{CYCLE_LIFETIME_SECONDS} s (renewed every {cycle:.0f} s plus jitter), "
        f"{observed:.0f} s observed: {total_renewals} new tokens served, "
        f"{total_calls} upstream calls = {total_calls / max(1, total_renewals):.3f} calls per "
        f"account per cycle; accounts with calls != new tokens: {odd} "
        f"(calls and tokens are sampled at slightly different instants); "
        f"{len(latencies)} sampling requests, slowest {max(latencies) * 1000:.0f} ms, "
        f"{sum(1 for s in latencies if s > 1)} over 1 s"
    )


def profile(args: argparse.Namespace, directory: Path, config: Path) -> int:
    """The broker under pyinstrument, driven by wrk; prints the sampled call tree."""
    port = free_port()
    output = directory / "profile.txt"
    env = child_env(BROKER_CONFIG=str(config), BENCH_PROFILE=str(output))
    command = launch_command("uvicorn", "service.api.app:create_app_from_env", port)
    server = start_server("profiled", command, directory, port, env)
    try:
        server.wait("/readyz")
        drive(server.url, 2, args.connections)
        server.process.send_signal(signal.SIGUSR1)
        run = drive(server.url, args.seconds, args.connections)
        server.process.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not output.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        print(f"profiled broker: {run.rps:.0f} req/s (sampling slows it down)")
    finally:
        server.stop()
    print(output.read_text(encoding="utf-8"))
    return 0


def _machine() -> str:
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout  # noqa: S607
    model = next(
        (line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?"
    )
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"machine: {os.cpu_count()} CPUs ({model}), {memory:.1f} GiB RAM, Python "
        f"{sys.version.split()[0]}; server on CPU {SERVER_CPU}, wrk/Redis/simulator on CPU "
        f"{CLIENT_CPU}"
    )


if __name__ == "__main__":
    sys.exit(main())
