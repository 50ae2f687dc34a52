"""The `/_sim` control API that tests use to inspect and steer the simulator."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, Response, delete, get, post, put
from litestar.di import NamedDependency
from pydantic import ValidationError

from service.simulator.auth import json_object
from service.simulator.faults import FaultRule
from service.simulator.state import SimulatorState, Stats


class ControlError(Exception):
    """Invalid control input; answered with 400 (or its `status`) and the reasons."""

    status = 400

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.errors = errors or []


class UnknownUserError(ControlError):
    """A control call named a user the simulator does not know; answered with 404."""

    status = 404


def _control_error(_: Request[Any, Any, Any], error: ControlError) -> Response[dict[str, Any]]:
    return Response(
        {"message": error.message, "errors": error.errors},
        status_code=error.status,
    )


async def _json_object(request: Request[Any, Any, Any]) -> dict[str, Any]:
    try:
        return json_object(await request.body())
    except ValueError as error:
        raise ControlError(str(error)) from error


def _problems(error: ValidationError) -> list[str]:
    return [
        f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}".removeprefix(": ")
        for problem in error.errors()
    ]


class ControlController(Controller):
    """Counters, settings, fault rules, revocation and reset; not part of Monogoto's API."""

    path = "/_sim"
    exception_handlers = {ControlError: _control_error}  # noqa: RUF012 (Litestar reads it from the class)

    @get("/healthz", operation_id="simHealthz")
    async def healthz(self) -> dict[str, str]:
        """The simulator is up."""
        return {"status": "ok"}

    @get("/stats", operation_id="simStats")
    async def stats(self, sim: NamedDependency[SimulatorState]) -> Stats:
        """Every auth call so far, per endpoint, user and outcome."""
        return sim.stats()

    @get("/settings", operation_id="simSettings")
    async def settings(self, sim: NamedDependency[SimulatorState]) -> dict[str, Any]:
        """The settings in force."""
        return sim.settings.model_dump()

    @put("/settings", operation_id="simUpdateSettings")
    async def update_settings(
        self, request: Request[Any, Any, Any], sim: NamedDependency[SimulatorState]
    ) -> dict[str, Any]:
        """Change some settings; answers with all of them."""
        patch = await _json_object(request)
        try:
            sim.settings = sim.settings.updated(patch)
        except ValidationError as error:
            raise ControlError("invalid settings", _problems(error)) from error
        return sim.settings.model_dump()

    @get("/faults", operation_id="simFaults")
    async def faults(self, sim: NamedDependency[SimulatorState]) -> dict[str, list[dict[str, Any]]]:
        """The fault rules in order, with their remaining uses."""
        return {"faults": sim.faults.listing()}

    @post("/faults", operation_id="simAddFault", status_code=201)
    async def add_fault(
        self, request: Request[Any, Any, Any], sim: NamedDependency[SimulatorState]
    ) -> dict[str, Any]:
        """Append a fault rule."""
        payload = await _json_object(request)
        try:
            rule = FaultRule.model_validate(payload)
        except ValidationError as error:
            raise ControlError("invalid fault rule", _problems(error)) from error
        return sim.faults.add(rule)

    @delete("/faults", operation_id="simClearFaults")
    async def clear_faults(self, sim: NamedDependency[SimulatorState]) -> None:
        """Remove every fault rule."""
        sim.faults.clear()

    @post("/users/{username:str}/revoke", operation_id="simRevokeUser", status_code=204)
    async def revoke_user(self, username: str, sim: NamedDependency[SimulatorState]) -> None:
        """Revoke every token issued to the user so far (access and refresh, both dialects)."""
        if not sim.revoke(username):
            raise UnknownUserError(f"unknown user: {username}")

    @put("/users/{username:str}/password", operation_id="simSetPassword", status_code=204)
    async def set_password(
        self, username: str, request: Request[Any, Any, Any], sim: NamedDependency[SimulatorState]
    ) -> None:
        """Change the user's password: logins with the old one fail from now on; tokens
        already issued stay valid."""
        password = (await _json_object(request)).get("password")
        if not isinstance(password, str) or not password:
            raise ControlError("invalid password", ["password: must be a non-empty string"])
        if not sim.set_password(username, password):
            raise UnknownUserError(f"unknown user: {username}")

    @post("/reset", operation_id="simReset", status_code=204)
    async def reset(self, sim: NamedDependency[SimulatorState]) -> None:
        """Clear counters, faults and rate-limit logs; restore the startup settings."""
        sim.reset()
