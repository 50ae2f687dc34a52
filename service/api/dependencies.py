"""Dependency providers: what the lifespan and the guards put in place, handed to handlers."""

from __future__ import annotations

from typing import Any, cast

from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide

from service.api.security import Caller
from service.broker.core import TokenBroker
from service.broker.runtime import BrokerRuntime

RUNTIME_STATE_KEY = "runtime"


def provide_runtime(state: State) -> BrokerRuntime:
    """The running broker runtime (started by the app's lifespan)."""
    return cast(BrokerRuntime, state[RUNTIME_STATE_KEY])


def provide_broker(state: State) -> TokenBroker:
    """The token broker of the running runtime."""
    return cast(BrokerRuntime, state[RUNTIME_STATE_KEY]).broker


def provide_caller(request: Request[Caller, Any, Any]) -> Caller:
    """The caller the `requires_caller` guard identified."""
    return request.user


DEPENDENCIES = {
    "runtime": Provide(provide_runtime, sync_to_thread=False),
    "broker": Provide(provide_broker, sync_to_thread=False),
    "caller": Provide(provide_caller, sync_to_thread=False),
}
