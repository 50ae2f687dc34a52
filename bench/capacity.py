"""How many accounts one auth budget keeps supplied: the capacity benchmark (docs/performance.md).

Starts its own redis-server (free port), the Monogoto simulator with short token lifetimes and
a rate limit equal to the broker's auth budget, and for each N: three `serve` replicas of a config
with N accounts (a key prefix of their own, the simulator's counters and rate-limit log reset).
The theoretical capacity is budget calls per second x (lifetime - min_remaining_seconds); N is
each given fraction of it. Per N it measures the cold start (until every account holds a token;
what a caller asking for the last account still without one waits), then reads every account's token
every 2 s through the replicas in turn for `--lifetimes` token lifetimes, and counts the reads
that failed or had less than min_remaining_seconds left, the simulator's 429s and the upstream
calls per account per lifetime.

    .venv/bin/python bench/capacity.py [--fractions 0.5,0.8,0.9,0.95,1.1] [--lifetime 25]
        [--budget 10/10] [--lifetimes 3] [--replicas 3] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import (  # noqa: E402
    CALLER_HEADERS,
    Server,
    account_name,
    child_env,
    free_port,
    redis_server,
    serve_command,
    start_server,
    user_name,
    write_config,
    write_users,
)
from service.broker.budget import WINDOW_MARGIN_SECONDS  # noqa: E402
from service.broker.runtime import open_store  # noqa: E402
from service.config import load_settings  # noqa: E402
from service.keys import new_encryption_key  # noqa: E402
from service.simulator.client import SimulatorControl  # noqa: E402
from service.simulator.process import SimulatorProcess  # noqa: E402
from tests.e2e.harness import AUTH_ENDPOINTS, scrape  # noqa: E402

AT_RISK = "monogoto_broker_accounts_at_risk"
UTILISATION = "monogoto_broker_auth_budget_utilisation"
DEFAULT_FRACTIONS = "0.5,0.8,0.9,0.95"
# With the default budget (10 per 10 s) and min_remaining_seconds (5), 25 s tokens make the
# capacity 20 accounts: every default fraction, and 110 %, is a whole number of accounts.
# --quick: a check that the bench works (about a minute), not a measurement.
QUICK = {
    "fractions": "0.5",
    "lifetime": 10.0,
    "budget": "4/2",
    "lifetimes": 2.0,
    "min_remaining": 3.0,
}


@dataclass(frozen=True)
class Setup:
    """What every N of one invocation shares."""

    lifetime: float
    limit: int
    period: float
    min_remaining: float
    lifetimes: float
    replicas: int
    interval: float
    max_wait: float

    @property
    def capacity(self) -> float:
        """Accounts the budget can renew: calls per second x (lifetime - min_remaining)."""
        return self.limit / self.period * (self.lifetime - self.min_remaining)

    @property
    def window(self) -> float:
        """The budget's window as the broker counts it: widened for network jitter."""
        return self.period + WINDOW_MARGIN_SECONDS


@dataclass(frozen=True)
class Read:
    """One token read: which account, when (monotonic), the answer and how long it took."""

    account: str
    status: int  # 0: no HTTP answer
    expires_in: int | None
    seconds: float


@dataclass
class ColdStart:
    """From spawning the replicas: all ready, all accounts holding a token. When the first
    replica is ready, how many accounts have no token yet, and a caller asks it for the last of
    them: its first answer, and how long it waited for a token in all, retrying after each
    Retry-After."""

    without_token: int = 0
    caller_account: str | None = None
    ready: float = math.nan
    all_tokens: float = math.nan
    first_status: int = 0
    first_seconds: float = math.nan
    served_after: float = math.nan


@dataclass
class Result:
    """One N's figures."""

    accounts: int
    fraction: float
    cold: ColdStart
    reads: list[Read] = field(default_factory=list)
    rate_limited: int = 0
    calls_per_lifetime: float = 0.0
    at_risk: float | None = None
    utilisation: float | None = None


def failed_reads(reads: list[Read], min_remaining: float) -> list[Read]:
    """Reads with no token, or one with less than `min_remaining` seconds left."""
    return [
        r for r in reads if r.status != 200 or r.expires_in is None or r.expires_in < min_remaining
    ]


def parse_budget(text: str) -> tuple[int, float]:
    """`LIMIT/PERIOD` as (limit, period seconds)."""
    limit, _, period = text.partition("/")
    try:
        parsed = int(limit), float(period)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not LIMIT/PERIOD: {text!r}") from None
    if parsed[0] < 1 or parsed[1] <= 0:
        raise argparse.ArgumentTypeError(f"LIMIT >= 1 and PERIOD > 0: {text!r}")
    return parsed


def simulator_counts(control: SimulatorControl) -> tuple[Counter[str], int]:
    """Auth calls the simulator answered, per user, and the auth calls it refused with 429."""
    answered: Counter[str] = Counter()
    refused = 0
    for row in control.stats()["calls"]:
        if row["endpoint"] not in AUTH_ENDPOINTS:
            continue
        if row["outcome"] == "rate_limited":
            refused += row["count"]
        else:
            answered[row["user"]] += row["count"]
    return answered, refused


async def read_token(client: httpx.AsyncClient, account: str) -> tuple[Read, float | None]:
    """One GET of `account`'s token; the read and the answer's Retry-After, if any."""
    started = time.monotonic()
    try:
        answer = await client.get(f"/v1/accounts/{account}/token")
    except httpx.HTTPError:
        return Read(account, 0, None, time.monotonic() - started), None
    seconds = time.monotonic() - started
    if answer.status_code != 200:
        retry_after = answer.headers.get("Retry-After")
        wait = float(retry_after) if retry_after and retry_after.isdigit() else None
        return Read(account, answer.status_code, None, seconds), wait
    return Read(account, 200, int(answer.json()["expires_in"]), seconds), None


async def wait_ready(server: Server) -> None:
    """Until `server` answers /readyz with 200 (RuntimeError if it exits or never does)."""
    await asyncio.to_thread(server.wait, "/readyz")


async def cold_start(
    setup: Setup, replicas: list[Server], clients: list[httpx.AsyncClient], config: Path, n: int
) -> ColdStart:
    """The cold start of replicas spawned just now."""
    spawned = time.monotonic()
    cold = ColdStart()
    timeout = 60 + 3 * n * setup.period / setup.limit + setup.lifetime
    names = [account_name(i) for i in range(n)]
    store = open_store(load_settings(config))
    try:
        readiness = [asyncio.ensure_future(wait_ready(r)) for r in replicas]
        done, _ = await asyncio.wait(readiness, return_when=asyncio.FIRST_COMPLETED)
        first = next(i for i, task in enumerate(readiness) if task in done)
        versions = await store.versions(names)
        missing = [name for name in names if versions.get(name, 0) < 1]
        cold.without_token = len(missing)

        async def caller(account: str) -> None:
            cold.caller_account = account
            asked = time.monotonic()
            while time.monotonic() - spawned < timeout:
                read, retry_after = await read_token(clients[first], account)
                if math.isnan(cold.first_seconds):
                    cold.first_status, cold.first_seconds = read.status, read.seconds
                if read.status == 200:
                    cold.served_after = time.monotonic() - asked
                    return
                await asyncio.sleep(max(0.2, retry_after or 1.0))

        async def all_tokens() -> None:
            while time.monotonic() - spawned < timeout:
                if min((await store.versions(names)).values(), default=0) >= 1:
                    cold.all_tokens = time.monotonic() - spawned
                    return
                await asyncio.sleep(0.1)

        async def ready() -> None:
            await asyncio.gather(*readiness)
            cold.ready = time.monotonic() - spawned

        # The caller asks for the last account (by name) still without a token, if any.
        waiting = [caller(missing[-1])] if missing else []
        await asyncio.gather(*waiting, all_tokens(), ready())
    finally:
        await store.close()
    return cold


async def steady(setup: Setup, clients: list[httpx.AsyncClient], n: int) -> list[Read]:
    """Every account read every `interval` s, through the replicas in turn, for the run."""
    reads: list[Read] = []
    begin = time.monotonic()
    end = begin + setup.lifetimes * setup.lifetime

    async def account(index: int) -> None:
        start = begin + index * setup.interval / n
        turn = 0
        while (at := start + turn * setup.interval) < end:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            client = clients[(turn + index) % len(clients)]
            read, _ = await read_token(client, account_name(index))
            reads.append(read)
            # A read slower than the interval skips the slots it overran.
            turn = max(turn + 1, math.ceil((time.monotonic() - start) / setup.interval))

    await asyncio.gather(*(account(i) for i in range(n)))
    return reads


def metric_max(replicas: list[Server], name: str) -> float | None:
    """The largest value of gauge `name` over the replicas, None if none exposes it."""
    values = []
    for replica in replicas:
        samples = scrape(replica.url).get(name, [])
        values += [value for _, value in samples]
    return max(values) if values else None


async def measure_n(
    setup: Setup,
    *,
    n: int,
    fraction: float,
    replicas: list[Server],
    config: Path,
    control: SimulatorControl,
) -> Result:
    """Cold start, then the steady run, of `replicas` (just spawned) serving `n` accounts."""
    timeout = httpx.Timeout(setup.max_wait + 10)
    clients = [
        httpx.AsyncClient(base_url=r.url, timeout=timeout, headers=CALLER_HEADERS) for r in replicas
    ]
    try:
        cold = await cold_start(setup, replicas, clients, config, n)
        before, _ = simulator_counts(control)
        started = time.monotonic()
        reads = await steady(setup, clients, n)
        lifetimes = (time.monotonic() - started) / setup.lifetime
        after, refused = simulator_counts(control)
    finally:
        for client in clients:
            await client.aclose()
    calls = sum(after[user_name(i)] - before[user_name(i)] for i in range(n))
    return Result(
        accounts=n,
        fraction=fraction,
        cold=cold,
        reads=reads,
        rate_limited=refused,
        calls_per_lifetime=calls / n / lifetimes,
        at_risk=metric_max(replicas, AT_RISK),
        utilisation=metric_max(replicas, UTILISATION),
    )


def seconds(value: float) -> str:
    """`value` s, or `-` when it never happened."""
    return "-" if math.isnan(value) else f"{value:.1f} s"


def kinds(failed: list[Read]) -> str:
    """What went wrong, e.g. ` (503: 12, too short: 1)`, or nothing."""
    counts = Counter(
        "too short" if r.status == 200 else str(r.status or "no answer") for r in failed
    )
    return (
        f" ({', '.join(f'{kind}: {count}' for kind, count in counts.most_common())})"
        if counts
        else ""
    )


def describe(setup: Setup, result: Result) -> str:
    """One N's figures in a few lines."""
    failed = failed_reads(result.reads, setup.min_remaining)
    cold = result.cold
    lines = [
        f"N={result.accounts} ({result.fraction:.0%} of capacity): {len(result.reads)} reads, "
        f"{len(failed)} failed or short{kinds(failed)}, "
        f"{result.rate_limited} upstream 429s, "
        f"{result.calls_per_lifetime:.2f} upstream calls per account per lifetime, "
        f"slowest read {max((r.seconds for r in result.reads), default=0) * 1000:.0f} ms",
        f"  cold start: replicas ready {seconds(cold.ready)}, all accounts hold tokens "
        f"{seconds(cold.all_tokens)}; {cold.without_token} without a token when the first "
        f"replica was ready"
        + (
            f"; a caller of {cold.caller_account} then: first answer "
            f"{cold.first_status or 'none'} after {seconds(cold.first_seconds)}, a token after "
            f"{seconds(cold.served_after)} in all (retrying after Retry-After)"
            if cold.caller_account
            else ""
        ),
    ]
    gauges = [
        f"{name} {'absent' if value is None else f'{value:g}'}"
        for name, value in ((AT_RISK, result.at_risk), (UTILISATION, result.utilisation))
    ]
    lines.append("  " + ", ".join(gauges) + " (max over the replicas at the end)")
    if failed:
        by_account = Counter(r.account for r in failed)
        listed = ", ".join(f"{name} ({count})" for name, count in by_account.most_common(12))
        more = " ..." if len(by_account) > 12 else ""
        line = f"  failures in {len(by_account)} of {result.accounts} accounts"
        excess = result.accounts - math.floor(setup.capacity)
        if excess > 0:
            # Confined or scattered: the share of the failures the `excess` worst accounts hold.
            top = sum(count for _, count in by_account.most_common(excess))
            line += f"; the {excess} worst (N - capacity) hold {top / len(failed):.0%} of them"
        lines.append(f"{line}: {listed}{more}")
    return "\n".join(lines)


def table(setup: Setup, results: list[Result]) -> str:
    """The per-N figures as a Markdown table."""
    rows = [
        "| N | of capacity | reads | failed or short | 429s | calls/account/lifetime "
        "| slowest read | cold start: all tokens | without token at first ready "
        "| their last one's caller: first answer | ... token after (waited in all) "
        "| accounts at risk |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        failed = failed_reads(result.reads, setup.min_remaining)
        cold = result.cold
        slowest = max((r.seconds for r in result.reads), default=0)
        accounts = len({r.account for r in failed})
        at_risk = "absent" if result.at_risk is None else f"{result.at_risk:g}"
        first = f"{cold.first_status or 'none'} after {seconds(cold.first_seconds)}"
        if cold.caller_account is None:
            first = "(none left)"
        rows.append(
            f"| {result.accounts} | {result.fraction:.0%} | {len(result.reads)} "
            f"| {len(failed)} ({accounts} accounts) | {result.rate_limited} "
            f"| {result.calls_per_lifetime:.2f} | {slowest:.2f} s | {seconds(cold.all_tokens)} "
            f"| {cold.without_token} | {first} | {seconds(cold.served_after)} | {at_risk} |"
        )
    return "\n".join(rows)


def run(setup: Setup, fractions: list[float], stack: ExitStack) -> int:
    """Every N in turn; processes stop when `stack` closes."""
    directory = Path(tempfile.mkdtemp(prefix="monogoto-broker-capacity-"))
    stack.callback(shutil.rmtree, directory, ignore_errors=True)
    # Whole accounts, at most the fraction asked for; the table shows the fraction run.
    counts = [max(1, math.floor(f * setup.capacity)) for f in fractions]
    (directory / "keys").write_text(new_encryption_key() + "\n", encoding="utf-8")
    users = write_users(directory, max(counts))
    redis_url = stack.enter_context(redis_server(directory))
    simulator = SimulatorProcess.start(
        *("--users", str(users), "--token-lifetime", f"{setup.lifetime:g}"),
        *("--rate-limit", str(setup.limit), "--rate-period", f"{setup.period:g}"),
        log_path=directory / "simulator.log",
    )
    stack.callback(simulator.stop)
    control = stack.enter_context(SimulatorControl(simulator.url))
    print(
        f"capacity: budget {setup.limit} calls per {setup.period:g} s (broker and simulator), "
        f"tokens of {setup.lifetime:g} s, min_remaining_seconds {setup.min_remaining:g}: "
        f"{setup.limit / setup.period:g} calls/s x {setup.lifetime - setup.min_remaining:g} s = "
        f"{setup.capacity:g} accounts; {setup.replicas} replicas; every account read every "
        f"{setup.interval:g} s for {setup.lifetimes:g} lifetimes after its cold start",
        flush=True,
    )
    # The broker widens its budget window by 1 s (network jitter, docs/broker.md), and the
    # simulator's `exp` counts from `iat` in whole seconds: a short window or lifetime leaves
    # less than the theoretical capacity.
    usable = setup.limit / setup.window * (setup.lifetime - 1 - setup.min_remaining)
    print(
        f"  (the broker's window is {setup.window:g} s, and a token loses up to 1 s to `iat` "
        f"rounded down: about {usable:.1f} accounts fit at most)",
        flush=True,
    )
    results = []
    for n in counts:
        control.reset()  # counters and rate-limit log; the startup settings stay
        config = write_config(
            directory,
            f"n{n}",
            redis_url,
            simulator.url,
            accounts=n,
            auth_rate=(setup.limit, setup.period),
            refresh={"min_remaining_seconds": setup.min_remaining},
            key_prefix=f"capacity{n}",
            api={"max_wait_seconds": setup.max_wait},
        )
        replicas = []
        for index in range(setup.replicas):
            port = free_port()
            command = serve_command(config, port)
            server = start_server(f"n{n}-replica{index}", command, directory, port, child_env())
            stack.callback(server.stop)
            replicas.append(server)
        result = asyncio.run(
            measure_n(
                setup,
                n=n,
                fraction=n / setup.capacity,
                replicas=replicas,
                config=config,
                control=control,
            )
        )
        for replica in replicas:
            replica.stop()
        results.append(result)
        print(describe(setup, result), flush=True)
    print("\n" + table(setup, results))
    return 0


def main() -> int:
    """Parse the options, run, print; non-zero only when the setup fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--fractions", help=f"of the capacity, comma-separated ({DEFAULT_FRACTIONS})"
    )
    parser.add_argument("--lifetime", type=float, help="token lifetime, seconds (25)")
    parser.add_argument("--budget", help="auth budget LIMIT/PERIOD, also the simulator's (10/10)")
    parser.add_argument("--lifetimes", type=float, help="steady run per N, in lifetimes (3)")
    parser.add_argument("--min-remaining", type=float, help="min_remaining_seconds (5)")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between reads")
    parser.add_argument("--max-wait", type=float, default=10.0, help="api.max_wait_seconds")
    parser.add_argument("--quick", action="store_true", help="defaults for a check: " + str(QUICK))
    args = parser.parse_args()
    defaults: dict[str, object] = dict(QUICK) if args.quick else {}

    def pick(name: str, fallback: object) -> object:
        """The option given, else the --quick default, else `fallback`."""
        given = getattr(args, name)
        return given if given is not None else defaults.get(name, fallback)

    try:
        limit, period = parse_budget(str(pick("budget", "10/10")))
        fractions = [float(f) for f in str(pick("fractions", DEFAULT_FRACTIONS)).split(",")]
    except (argparse.ArgumentTypeError, ValueError) as error:
        parser.error(str(error))
    setup = Setup(
        lifetime=float(str(pick("lifetime", 25.0))),
        limit=limit,
        period=period,
        min_remaining=float(str(pick("min_remaining", 5.0))),
        lifetimes=float(str(pick("lifetimes", 3.0))),
        replicas=args.replicas,
        interval=args.interval,
        max_wait=args.max_wait,
    )
    if setup.lifetime <= setup.min_remaining or not all(f > 0 for f in fractions):
        parser.error("the lifetime must exceed min_remaining_seconds, the fractions be > 0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with ExitStack() as stack:
        try:
            return run(setup, fractions, stack)
        except (RuntimeError, OSError) as error:
            print(f"capacity bench: setup failed: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
