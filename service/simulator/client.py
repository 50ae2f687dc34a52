"""A small synchronous client of the simulator's `/_sim` control API, for tests and benchmarks."""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import quote

import httpx

from service.simulator.state import Stats


class SimulatorControlError(Exception):
    """The simulator refused a control call; the message carries its reasons."""


class SimulatorControl:
    """Inspect and steer a running simulator at `base_url`."""

    def __init__(self, base_url: str, *, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=f"{self.base_url}/_sim", timeout=timeout)

    def __enter__(self) -> SimulatorControl:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def healthy(self) -> bool:
        """Whether the simulator answers its health check."""
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def stats(self) -> Stats:
        """Every auth call counted since the last reset."""
        return cast(Stats, self._json("GET", "/stats"))

    def calls(self, endpoint: str, outcome: str | None = None, user: str | None = None) -> int:
        """How many calls to `endpoint` were counted, optionally only one outcome and/or user."""
        return sum(
            row["count"]
            for row in self.stats()["calls"]
            if row["endpoint"] == endpoint
            and outcome in (None, row["outcome"])
            and user in (None, row["user"])
        )

    def settings(self) -> dict[str, Any]:
        """The settings in force."""
        return cast(dict[str, Any], self._json("GET", "/settings"))

    def set(self, **settings: float) -> dict[str, Any]:
        """Change settings (e.g. `rate_limit=2, rate_period_seconds=1`); returns all of them."""
        return cast(dict[str, Any], self._json("PUT", "/settings", settings))

    def fault(
        self,
        kind: str,
        *,
        endpoint: str | None = None,
        count: int = 1,
        status: int | None = None,
        retry_after: int | str | None = None,
        seconds: float | None = None,
        body: str | None = None,
    ) -> dict[str, Any]:
        """Append a fault rule (see docs/simulator.md); returns it with its remaining uses.

        A string `retry_after` is sent verbatim as the Retry-After header (e.g. "inf").
        """
        rule: dict[str, Any] = {"endpoint": endpoint, "kind": kind, "count": count}
        optional = {"status": status, "retry_after": retry_after, "seconds": seconds, "body": body}
        rule.update({name: value for name, value in optional.items() if value is not None})
        return cast(dict[str, Any], self._json("POST", "/faults", rule))

    def faults(self) -> list[dict[str, Any]]:
        """The fault rules in order, with their remaining uses."""
        return cast(list[dict[str, Any]], self._json("GET", "/faults")["faults"])

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        self._check(self._http.delete("/faults"))

    def revoke(self, username: str) -> None:
        """Revoke every token issued to `username` so far (access and refresh, both dialects).

        Tokens issued afterwards are valid. An unknown user raises SimulatorControlError (404).
        """
        self._check(self._http.post(f"/users/{quote(username, safe='')}/revoke"))

    def set_password(self, username: str, password: str) -> None:
        """Change `username`'s password: logins with the old one fail from now on (until a
        reset). An unknown user raises SimulatorControlError (404)."""
        self._check(
            self._http.put(
                f"/users/{quote(username, safe='')}/password", json={"password": password}
            )
        )

    def reset(self) -> None:
        """Clear counters, faults and rate-limit logs; restore the startup settings."""
        self._check(self._http.post("/reset"))

    def _json(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        return self._check(self._http.request(method, path, json=payload)).json()

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.is_error:
            request = response.request
            raise SimulatorControlError(
                f"{request.method} {request.url.path}: {response.status_code} {response.text}"
            )
        return response
