"""What 1,000 configured accounts cost one replica against 10 (docs/performance.md).

Starts its own redis-server (free port) and the Monogoto simulator (4 h tokens, its rate limit
and the broker's auth budget raised to 1,000 calls per second, so nothing waits for budget),
then seeds the store: one `serve` replica of a 1,000-account config logs every account in and
is stopped. Every later replica shares that key prefix, so it starts with a valid record for
each of its accounts. In alternating rounds, one `serve --workers 1` replica of 10 and one of
1,000 accounts: the time from spawning it until /readyz answers 200, its RSS 5 s after that,
the hot path's throughput (bench/run.py's wrk load on one account's token route) and the
simulator's auth calls meanwhile. Prints the medians and the ratios 1,000 against 10, then
checks that three replicas of 500 accounts starting on valid records make no upstream call, even
when every account's token is read once through them.

    .venv/bin/python bench/accounts.py [--rounds 3] [--seconds 10] [--connections 32]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    CALLER_HEADERS,
    Server,
    account_name,
    child_env,
    drive,
    free_port,
    redis_server,
    serve_command,
    start_server,
    write_config,
    write_users,
)
from service.broker.runtime import open_store  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.keys import new_encryption_key  # noqa: E402
from service.simulator.client import SimulatorControl  # noqa: E402
from service.simulator.process import SimulatorProcess  # noqa: E402
from tests.e2e.harness import AUTH_ENDPOINTS  # noqa: E402

FEW, MANY, FLEET = 10, 1000, 500
PREFIX = "accounts"  # every config's key prefix: the seeded records serve them all
BUDGET = (1000, 1.0)  # generous: start-up is never budget-bound
SETTLE_SECONDS = 5.0


@dataclass(frozen=True)
class Start:
    """One replica's start and load."""

    ready_seconds: float
    rss_mib: float
    rps: float
    cpu_us: float
    upstream_calls: int


def auth_calls(control: SimulatorControl) -> int:
    """Auth calls the simulator counted (any outcome) since its last reset."""
    return sum(r["count"] for r in control.stats()["calls"] if r["endpoint"] in AUTH_ENDPOINTS)


def seed(config: Path, directory: Path, accounts: int) -> float:
    """Let one replica of `config` log every account in; seconds it took."""
    port = free_port()
    started = time.monotonic()
    server = start_server("seed", serve_command(config, port), directory, port, child_env())
    try:
        server.wait("/readyz")

        async def all_hold_tokens() -> None:
            store = open_store(load_settings(config))
            names = [account_name(i) for i in range(accounts)]
            try:
                while min((await store.versions(names)).values(), default=0) < 1:
                    if time.monotonic() - started > 600:
                        raise RuntimeError("seeding: not every account got a token in 600 s")
                    await asyncio.sleep(0.5)
            finally:
                await store.close()

        asyncio.run(all_hold_tokens())
        return time.monotonic() - started
    finally:
        server.stop()


def start_one(name: str, config: Path, directory: Path, args: argparse.Namespace) -> Start:
    """Spawn a replica of `config`, time it to ready, weigh it, load it, stop it."""
    port = free_port()
    spawned = time.monotonic()
    server = start_server(name, serve_command(config, port), directory, port, child_env())
    try:
        server.wait("/readyz")
        ready = time.monotonic() - spawned
        time.sleep(SETTLE_SECONDS)
        rss = server.rss_bytes() / 2**20
        drive(server.url, 2, args.connections)  # warm-up
        cpu = server.cpu_seconds()
        run = drive(server.url, args.seconds, args.connections)
        cpu_us = (server.cpu_seconds() - cpu) / (run.rps * args.seconds) * 1e6
    finally:
        server.stop()
    return Start(ready, rss, run.rps, cpu_us, 0)


def fleet_calls(config: Path, directory: Path, control: SimulatorControl) -> tuple[int, int]:
    """Three replicas of `config` (FLEET accounts, seeded) started and every token read once
    through them in turn: (upstream auth calls, reads that were not 200)."""
    control.reset()
    replicas: list[Server] = []
    try:
        for index in range(3):
            port = free_port()
            command = serve_command(config, port)
            replicas.append(start_server(f"fleet{index}", command, directory, port, child_env()))
        for replica in replicas:
            replica.wait("/readyz")
        time.sleep(SETTLE_SECONDS)
        clients = [
            httpx.Client(base_url=r.url, headers=CALLER_HEADERS, timeout=30) for r in replicas
        ]
        try:
            failed = sum(
                clients[i % 3].get(f"/v1/accounts/{account_name(i)}/token").status_code != 200
                for i in range(FLEET)
            )
        finally:
            for client in clients:
                client.close()
        return auth_calls(control), failed
    finally:
        for replica in replicas:
            replica.stop()


def run(args: argparse.Namespace, directory: Path, stack: ExitStack) -> int:
    """Seed, measure, print."""
    (directory / "keys").write_text(new_encryption_key() + "\n", encoding="utf-8")
    users = write_users(directory, MANY)
    redis_url = stack.enter_context(redis_server(directory))
    simulator = SimulatorProcess.start(
        *("--users", str(users), "--rate-limit", str(BUDGET[0]), "--rate-period", "1"),
        log_path=directory / "simulator.log",
    )
    stack.callback(simulator.stop)
    control = stack.enter_context(SimulatorControl(simulator.url))
    configs = {
        count: write_config(
            directory,
            f"accounts{count}",
            redis_url,
            simulator.url,
            accounts=count,
            auth_rate=BUDGET,
            key_prefix=PREFIX,
        )
        for count in (FEW, MANY, FLEET)
    }
    seconds = seed(configs[MANY], directory, MANY)
    print(
        f"seeded: one replica logged {MANY} accounts in (4 h tokens, budget {BUDGET[0]} calls "
        f"per {BUDGET[1]:g} s) in {seconds:.1f} s; every replica below starts on those records",
        flush=True,
    )
    starts: dict[int, list[Start]] = {FEW: [], MANY: []}
    for round_number in range(1, args.rounds + 1):
        for count in (FEW, MANY):
            control.reset()
            start = start_one(f"r{round_number}-{count}", configs[count], directory, args)
            start = dataclasses.replace(start, upstream_calls=auth_calls(control))
            starts[count].append(start)
            print(
                f"  round {round_number} {count:>5} accounts: ready after "
                f"{start.ready_seconds:5.2f} s, RSS {start.rss_mib:6.1f} MiB, "
                f"{start.rps:7.0f} req/s, CPU {start.cpu_us:4.0f} us/req, "
                f"upstream calls {start.upstream_calls}",
                flush=True,
            )
    medians = {
        count: {
            "ready s": statistics.median(s.ready_seconds for s in runs),
            "RSS MiB": statistics.median(s.rss_mib for s in runs),
            "req/s": statistics.median(s.rps for s in runs),
            "CPU us/req": statistics.median(s.cpu_us for s in runs),
        }
        for count, runs in starts.items()
    }
    print(f"\nmedians of {args.rounds} rounds, and {MANY} accounts against {FEW}:")
    print(f"| figure | {FEW} accounts | {MANY} accounts | ratio |\n|---|---|---|---|")
    for figure in medians[FEW]:
        few, many = medians[FEW][figure], medians[MANY][figure]
        print(f"| {figure} | {few:.2f} | {many:.2f} | {many / few:.3f} |")
    calls, failed = fleet_calls(configs[FLEET], directory, control)
    print(
        f"\n3 replicas of {FLEET} accounts starting on valid records, every token read once "
        f"through them: {calls} upstream calls, {failed} reads not 200"
    )
    return 0


def main() -> int:
    """Parse the options and run; non-zero when the setup fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install wrk", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    directory = Path(tempfile.mkdtemp(prefix="monogoto-broker-accounts-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, directory, ignore_errors=True)
        try:
            return run(args, directory, stack)
        except (RuntimeError, OSError) as error:
            print(f"accounts bench: setup failed: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
