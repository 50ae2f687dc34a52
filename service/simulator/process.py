"""Starting the simulator as a child process, for tests, benchmarks and local tooling."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from service.simulator.client import SimulatorControl

_LISTENING = re.compile(r"listening on (http://\S+)")
_POLL_SECONDS = 0.05


def terminate(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM a child process, SIGKILL it if it has not exited after `timeout`; its exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


class SimulatorProcess:
    """A `monogoto-broker simulator` child process and the URL it serves."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path

    @classmethod
    def start(cls, *args: str, log_path: Path, timeout: float = 30.0) -> SimulatorProcess:
        """Start a simulator on a free port with extra CLI `args`; returns once it is healthy.

        Its stdout and stderr go to `log_path`. Raises RuntimeError if it does not come up.
        """
        command = [sys.executable, "-m", "service.cli", "simulator", "--port", "0", *args]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        deadline = time.monotonic() + timeout
        try:
            url = cls._await_url(process, log_path, deadline)
            with SimulatorControl(url, timeout=1.0) as control:
                while not control.healthy():
                    cls._check_alive(process, log_path, deadline)
                    time.sleep(_POLL_SECONDS)
        except BaseException:
            process.kill()
            process.wait()
            raise
        return cls(process, url, log_path)

    def stop(self, timeout: float = 10.0) -> int:
        """Ask the simulator to shut down (SIGTERM), killing it after `timeout`; the exit code."""
        return terminate(self.process, timeout)

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    @classmethod
    def _await_url(cls, process: subprocess.Popen[bytes], log_path: Path, deadline: float) -> str:
        while not (found := _LISTENING.search(log_path.read_text(errors="replace"))):
            cls._check_alive(process, log_path, deadline)
            time.sleep(_POLL_SECONDS)
        return found.group(1)

    @staticmethod
    def _check_alive(process: subprocess.Popen[bytes], log_path: Path, deadline: float) -> None:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace")
            raise RuntimeError(f"simulator exited with {process.returncode}:\n{log}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"simulator did not come up in time:\n{log_path.read_text(errors='replace')}"
            )
