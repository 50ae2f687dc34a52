"""Serve one ASGI app factory on 127.0.0.1 with one worker: `launch.py SERVER FACTORY PORT`.

SERVER is `uvicorn` (the production settings of `serve`, through `service.serving.serve_app`)
or `granian` (for the server comparison). The benchmark starts its baseline and variant apps
through this, so they run under the same server as the broker.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType

from granian import Granian
from granian.constants import Interfaces, Loops
from pyinstrument import Profiler

from service.serving import serve_app

# With this set, the process samples itself and writes a text profile there on exit.
PROFILE_ENV = "BENCH_PROFILE"


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _profile_on_signals(output: Path) -> None:
    """SIGUSR1 starts sampling, SIGUSR2 stops it and writes the call tree and the flat list."""
    profiler = Profiler(interval=0.0005, async_mode="disabled")

    def start(signum: int, frame: FrameType | None) -> None:
        profiler.start()

    def stop(signum: int, frame: FrameType | None) -> None:
        profiler.stop()
        tree = profiler.output_text(time="percent_of_total")
        flat = profiler.output_text(flat=True, time="percent_of_total")
        output.write_text(tree + "\n" + "\n".join(flat.splitlines()[:45]), encoding="utf-8")

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)


def main(argv: list[str]) -> int:
    """Serve until SIGTERM; the exit code."""
    server, factory, port = argv[0], argv[1], int(argv[2])
    signal.signal(signal.SIGTERM, _exit_cleanly)
    profile = os.environ.get(PROFILE_ENV)
    if server == "uvicorn" and profile:
        _profile_on_signals(Path(profile))
    if server == "uvicorn":
        serve_app(factory, host="127.0.0.1", port=port, workers=1)
    elif server == "granian":
        Granian(
            factory,
            address="127.0.0.1",
            port=port,
            interface=Interfaces.ASGI,
            workers=1,
            loop=Loops.uvloop,
            factory=True,
            log_access=False,
        ).serve()
    else:
        print(f"unknown server {server!r}: uvicorn or granian", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
