"""The simulator's HTTP surface: the auth endpoints, the protected endpoints, the app factory."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from litestar import Controller, Litestar, Request, Response, get, post
from litestar.di import NamedDependency, Provide
from litestar.response.base import ASGIResponse
from litestar.types import Receive, Send

from service.simulator.auth import Answer, answer
from service.simulator.control import ControlController
from service.simulator.faults import ApiEndpoint, AuthEndpoint
from service.simulator.protected import LEGACY_THINGS_PATH, V1_THINGS_PATH, protected_answer
from service.simulator.state import SimulatorState


class _HeadersOnly(ASGIResponse):
    """Announces a body (content-length and all) and never sends it."""

    async def send_body(self, send: Send, receive: Receive) -> None:
        # Returning without the body makes the server close the connection mid-response.
        return


class _DroppedResponse(Response[bytes]):
    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        return _HeadersOnly(
            body=self.content,
            headers=self.headers,
            media_type=self.media_type,
            status_code=self.status_code,
        )


def _response(result: Answer) -> Response[Any]:
    if not result.drop:
        return Response(
            result.content,
            status_code=result.status,
            media_type=result.media_type,
            headers=result.headers,
        )
    body = result.content if isinstance(result.content, str) else json.dumps(result.content)
    return _DroppedResponse(
        body.encode(),
        status_code=result.status,
        media_type=result.media_type,
        headers=result.headers,
    )


async def _deliver(result: Answer) -> Response[Any]:
    if result.delay > 0:
        await asyncio.sleep(result.delay)
    return _response(result)


async def _serve(
    request: Request[Any, Any, Any], sim: SimulatorState, endpoint: AuthEndpoint
) -> Response[Any]:
    client = request.client.host if request.client else "unknown"
    return await _deliver(answer(sim, endpoint, client, await request.body()))


async def _serve_protected(
    request: Request[Any, Any, Any], sim: SimulatorState, endpoint: ApiEndpoint
) -> Response[Any]:
    return await _deliver(protected_answer(sim, endpoint, request.headers.get("authorization")))


class AuthController(Controller):
    """Monogoto's authentication endpoints, both dialects (docs/simulator.md)."""

    path = "/"

    @post("/Auth", operation_id="legacyAuth", status_code=200)
    async def legacy_auth(
        self, request: Request[Any, Any, Any], sim: NamedDependency[SimulatorState]
    ) -> Response[Any]:
        """Legacy login: `{"UserName", "Password"}` → token and account data."""
        return await _serve(request, sim, "legacy_auth")

    @post("/v1/auth/token", operation_id="v1Token", status_code=200)
    async def v1_token(
        self, request: Request[Any, Any, Any], sim: NamedDependency[SimulatorState]
    ) -> Response[Any]:
        """v1 login: `{"username", "password"}` → access and refresh token."""
        return await _serve(request, sim, "v1_token")

    @post("/v1/auth/refresh", operation_id="v1Refresh", status_code=200)
    async def v1_refresh(
        self, request: Request[Any, Any, Any], sim: NamedDependency[SimulatorState]
    ) -> Response[Any]:
        """v1 refresh: `{"refresh_token"}` → a new pair; the old refresh token is spent."""
        return await _serve(request, sim, "v1_refresh")


class ProtectedController(Controller):
    """Stand-ins for Monogoto's API beyond auth: they only check the bearer token."""

    path = "/"

    @get(LEGACY_THINGS_PATH, operation_id="legacyThings")
    async def legacy_things(
        self, request: Request[Any, Any, Any], sim: NamedDependency[SimulatorState]
    ) -> Response[Any]:
        """Legacy console API: the user's things, for a token from `POST /Auth`."""
        return await _serve_protected(request, sim, "legacy_things")

    @get(V1_THINGS_PATH, operation_id="v1Things")
    async def v1_things(
        self, request: Request[Any, Any, Any], sim: NamedDependency[SimulatorState]
    ) -> Response[Any]:
        """v1 API: the user's things, for an access token from `/v1/auth/token` or refresh."""
        return await _serve_protected(request, sim, "v1_things")


def create_simulator_app(state: SimulatorState) -> Litestar:
    """Build the simulator's ASGI app around `state`."""

    def provide_sim() -> SimulatorState:
        return state

    return Litestar(
        route_handlers=[AuthController, ProtectedController, ControlController],
        dependencies={"sim": Provide(provide_sim, sync_to_thread=False)},
        openapi_config=None,
    )
