"""The `monogoto-broker` command line (README.md, "Command line")."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from service import keys
from service.broker.model import MAX_MIN_TTL_SECONDS
from service.config import ConfigError, check_config, config_path_from_env

EXIT_CONFIG_ERROR = 2


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _seconds(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_MIN_TTL_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of seconds from 0 to {MAX_MIN_TTL_SECONDS}, got {text}"
        )
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (0-65535), got {text}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="monogoto-broker",
        description="Central broker of Monogoto API access tokens for internal services.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = commands.add_parser(
        "simulator",
        help="run the Monogoto authentication API simulator (both dialects)",
        description="Serve a local stand-in for Monogoto's /Auth and /v1/auth/* endpoints.",
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sim.add_argument("--port", type=_port, default=8090, help="port to bind (default 8090)")
    sim.add_argument(
        "--token-lifetime",
        type=_positive_float,
        default=4 * 3600,
        metavar="S",
        help="lifetime of access tokens in seconds (default 14400, as Monogoto's v1 API)",
    )
    sim.add_argument(
        "--refresh-lifetime",
        type=_positive_float,
        default=24 * 3600,
        metavar="S",
        help="lifetime of v1 refresh tokens in seconds (default 86400)",
    )
    sim.add_argument(
        "--rate-limit",
        type=_positive_int,
        default=5,
        metavar="N",
        help="calls allowed per client IP and auth endpoint in one window (default 5)",
    )
    sim.add_argument(
        "--rate-period",
        type=_positive_float,
        default=60.0,
        metavar="S",
        help="length of the rate-limit window in seconds (default 60)",
    )
    sim.add_argument(
        "--users",
        type=Path,
        metavar="FILE",
        help="YAML mapping of username to password (default: the documented demo user)",
    )

    serve = commands.add_parser(
        "serve",
        help="run the broker",
        description="Serve the broker's HTTP API until SIGTERM or Ctrl-C (see docs/running.md).",
    )
    serve.add_argument("--config", type=Path, help="config file (default: $BROKER_CONFIG)")
    serve.add_argument(
        "--host",
        default="0.0.0.0",  # noqa: S104 (a server in a container listens on every interface)
        help="address to bind (default 0.0.0.0)",
    )
    serve.add_argument("--port", type=_port, default=8080, help="port to bind (default 8080)")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="N",
        help="worker processes (default 1; on Kubernetes, scale with replicas instead)",
    )

    dev = commands.add_parser(
        "dev",
        help="run the simulator and the broker together, with demo accounts and a demo caller",
        description="The embedded default: no Monogoto account or Redis needed. Prints the demo "
        "caller key and ready-to-paste curl commands.",
    )
    dev.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    dev.add_argument("--port", type=_port, default=8080, help="port to bind (default 8080)")
    dev.add_argument(
        "--redis-url",
        metavar="URL",
        help="use this Redis instead of the in-memory store (e.g. redis://127.0.0.1:6379/0)",
    )

    check = commands.add_parser(
        "check-config",
        help="validate a configuration file and its environment overrides",
        description="Exit 0 if the configuration is valid, else print one line per problem "
        "and exit 2.",
    )
    check.add_argument("--config", type=Path, help="config file (default: $BROKER_CONFIG)")
    check.add_argument(
        "--helm-values",
        type=Path,
        action="append",
        metavar="FILE",
        help="instead, check the config the Helm chart would mount with this values file "
        "(repeatable, merged in order like helm -f; docs/operations.md)",
    )

    token = commands.add_parser(
        "token",
        help="print a valid token of an account, for scripts and cron jobs",
        description="Ask a running broker for a token of ACCOUNT and print it alone on "
        'standard output, e.g. curl -H "Authorization: Bearer $(monogoto-broker token '
        'fleet-eu)". Exit codes: 0 printed, 2 usage, 3 refused by the broker (400, 401, 403, '
        "404, 429), 4 broker or Monogoto unavailable (see docs/callers.md).",
    )
    token.add_argument("account", metavar="ACCOUNT", help="the configured account name")
    token.add_argument(
        "--broker",
        metavar="URL",
        help="the broker's base URL (default: $MONOGOTO_BROKER_URL, else http://127.0.0.1:8080)",
    )
    credential = token.add_mutually_exclusive_group()
    credential.add_argument(
        "--key-file",
        type=Path,
        metavar="F",
        help="file holding the caller key (default: $MONOGOTO_BROKER_API_KEY)",
    )
    credential.add_argument(
        "--service-account-token-file",
        type=Path,
        metavar="F",
        help="file holding a Kubernetes service-account token, sent instead of a key (for a "
        "broker that authenticates callers by their Kubernetes identity)",
    )
    token.add_argument(
        "--min-ttl",
        type=_seconds,
        default=0,
        metavar="S",
        help="the token must stay valid at least this many seconds (default 0)",
    )
    token.add_argument(
        "--max-wait",
        type=_non_negative_float,
        default=30.0,
        metavar="S",
        help="how long to keep asking while the broker answers 503 with Retry-After "
        "(default 30; 0: ask once)",
    )
    token.add_argument(
        "--timeout",
        type=_positive_float,
        default=15.0,
        metavar="S",
        help="timeout of each request to the broker (default 15)",
    )

    commands.add_parser(
        "new-api-key",
        help="print a new caller key and, on a second line, its sha256: digest for the config",
    )
    commands.add_parser(
        "new-encryption-key",
        help="print a new 'kid:base64key' line for the encryption key file",
    )
    return parser


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _check_config(path: Path | None) -> int:
    path = path or config_path_from_env()
    if path is None:
        print("check-config: no config file given (--config PATH or BROKER_CONFIG)")
        return EXIT_CONFIG_ERROR
    try:
        checked = check_config(path)
    except ConfigError as error:
        for line in [*(f"warning: {text}" for text in error.warnings), *error.report]:
            print(line)
        return EXIT_CONFIG_ERROR
    for warning in checked.warnings:
        print(f"warning: {warning}")
    settings = checked.settings
    accounts, callers = len(settings.accounts), len(settings.callers)
    print(f"{path}: OK ({_count(accounts, 'account')}, {_count(callers, 'caller')})")
    return 0


def _check_helm_values(paths: list[Path], config: Path | None) -> int:
    # What the chart (helm/monogoto-broker) would mount: service/helm_values.py.
    from service.helm_values import check_helm_values  # noqa: PLC0415 (only for this option)

    if config is not None:
        print("check-config: give --config or --helm-values, not both")
        return EXIT_CONFIG_ERROR
    try:
        summary = check_helm_values(paths)
    except ConfigError as error:
        for problem in error.problems:
            print(problem)
        return EXIT_CONFIG_ERROR
    print(summary)
    return 0


def _simulator(args: argparse.Namespace) -> int:
    from service.simulator.server import run_simulator  # noqa: PLC0415 (heavy import)

    return run_simulator(
        host=args.host,
        port=args.port,
        token_lifetime=args.token_lifetime,
        refresh_lifetime=args.refresh_lifetime,
        rate_limit=args.rate_limit,
        rate_period=args.rate_period,
        users_file=args.users,
    )


def _serve(args: argparse.Namespace) -> int:
    from service.serving import run_serve  # noqa: PLC0415 (heavy import)

    config = args.config or config_path_from_env()
    return run_serve(config, host=args.host, port=args.port, workers=args.workers)


def _dev(args: argparse.Namespace) -> int:
    from service.dev import run_dev  # noqa: PLC0415 (heavy import)

    return run_dev(host=args.host, port=args.port, redis_url=args.redis_url)


def _token(args: argparse.Namespace) -> int:
    from service.token_command import run_token  # noqa: PLC0415 (not needed elsewhere)

    return run_token(
        args.account,
        broker=args.broker,
        key_file=args.key_file,
        service_account_token_file=args.service_account_token_file,
        min_ttl=args.min_ttl,
        max_wait=args.max_wait,
        timeout=args.timeout,
    )


def _new_api_key(_: argparse.Namespace) -> int:
    key, digest = keys.new_api_key()
    print(key)
    print(digest)
    return 0


def _new_encryption_key(_: argparse.Namespace) -> int:
    print(keys.new_encryption_key())
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "simulator": _simulator,
    "serve": _serve,
    "dev": _dev,
    "check-config": lambda args: (
        _check_helm_values(args.helm_values, args.config)
        if args.helm_values
        else _check_config(args.config)
    ),
    "token": _token,
    "new-api-key": _new_api_key,
    "new-encryption-key": _new_encryption_key,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    return _COMMANDS[args.command](args)  # argparse accepts no other command


if __name__ == "__main__":
    sys.exit(main())
