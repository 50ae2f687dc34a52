"""Small helpers shared by tests of every level (importable as `tests.support`)."""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from litestar import Litestar

from service.simulator.process import terminate


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def eventually(check: Callable[[], bool | Awaitable[bool]], *, within: float = 10.0) -> None:
    """Poll `check` (plain or async) until it holds; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


class _InLoopServer(uvicorn.Server):
    """uvicorn in the test's event loop, leaving the process's signal handlers alone."""

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@asynccontextmanager
async def served(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    """`app` served by uvicorn on a free port of 127.0.0.1, in this event loop, until the block
    ends (its lifespan shutdown included), and an HTTP client of it."""
    port = free_port()
    server = _InLoopServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False)
    )
    serving = asyncio.create_task(server.serve())
    await eventually(lambda: server.started or serving.done())
    assert server.started, "uvicorn did not start"
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        await serving


class ServeProcess:
    """`monogoto-broker serve` as a child process on a free port of 127.0.0.1.

    Its stdout and stderr go to `directory/serve.log` and its temporary files (e.g. the metrics
    directory of several workers) to `directory/tmp`; `BROKER_*` variables are not inherited,
    and `env` is added to the rest. With `tls_ca` (the config has `tls`), its URL is https://
    and `verify` trusts that CA.
    """

    def __init__(
        self,
        config: Path,
        directory: Path,
        *,
        workers: int = 1,
        tls_ca: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        scheme = "http" if tls_ca is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify: ssl.SSLContext | bool = (
            True if tls_ca is None else ssl.create_default_context(cafile=tls_ca)
        )
        self.log_path = directory / "serve.log"
        self.temp_dir = directory / "tmp"
        self.temp_dir.mkdir(parents=True)
        inherited = os.environ.items()
        environment = {name: value for name, value in inherited if not name.startswith("BROKER_")}
        environment |= {**(env or {}), "TMPDIR": str(self.temp_dir)}
        command = [
            *(sys.executable, "-m", "service.cli", "serve", "--config", str(config)),
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers)),
        ]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603
                command, stdout=log, stderr=subprocess.STDOUT, env=environment
            )

    def wait_until_ok(self, path: str = "/readyz", timeout: float = 90.0) -> None:
        """Poll `path` until it answers 200; fail with the log if the process exits first or
        the deadline passes."""
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0, verify=self.verify) as http:
            while True:
                if self.process.poll() is not None:
                    pytest.fail(f"serve exited with {self.process.returncode}:\n{self.log()}")
                try:
                    if http.get(path).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"{path} never answered 200 in {timeout} s:\n{self.log()}")
                time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; the exit code."""
        return terminate(self.process, timeout)

    def kill(self) -> None:
        """Kill it unless it has exited."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log(self) -> str:
        """Everything it wrote so far."""
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[str]:
        """Its output, line by line."""
        return self.log().splitlines()


class SecretVolume:
    """A directory laid out like a mounted Kubernetes Secret or ConfigMap: each file is a
    symlink `name -> ..data/name`, and `..data` a symlink to a directory of the current files.
    `write` updates it the way the kubelet does: a new directory, then `..data` swapped to it
    in one rename, then the old directory removed."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._versions = 0

    def path(self, name: str) -> Path:
        """Where file `name` appears to its readers."""
        return self.root / name

    def write(self, files: dict[str, str]) -> None:
        """Replace every file at once with `files` (name -> content)."""
        self._versions += 1
        version = self.root / f"..{self._versions}"
        version.mkdir()
        for name, content in files.items():
            (version / name).write_text(content, encoding="utf-8")
        data = self.root / "..data"
        previous = data.resolve() if data.is_symlink() else None
        swap = self.root / "..data_tmp"
        swap.symlink_to(version.name)
        os.replace(swap, data)
        for name in files:
            if not self.path(name).is_symlink():
                self.path(name).symlink_to(Path("..data") / name)
        if previous is not None:
            for old in previous.iterdir():
                old.unlink()
            previous.rmdir()
