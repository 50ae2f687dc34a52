"""`/v1/accounts`: the state of the accounts a caller may use (never a token)."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from service.api.problems import problem_responses
from service.api.schemas import AccountBody, AccountsBody
from service.api.security import Caller, requires_caller
from service.broker.runtime import BrokerRuntime


class AccountController(Controller):
    """Accounts, as far as the calling service may see them."""

    path = "/accounts"
    tags = ("accounts",)
    guards = (requires_caller,)

    @get(
        operation_id="listAccounts",
        summary="List the accounts this caller may use",
        responses=problem_responses(401),
    )
    async def list_accounts(
        self, caller: NamedDependency[Caller], runtime: NamedDependency[BrokerRuntime]
    ) -> AccountsBody:
        """Each account's dialect, status (`ok`, `refreshing`, `failing`, `credentials_rejected`,
        `no_token`), token expiry, last refresh, last error, next planned renewal and whether
        the plan puts it at risk; times are ISO 8601 UTC or null."""
        views = runtime.broker.accounts()
        plan = runtime.capacity
        return AccountsBody(
            [
                AccountBody.of(view, plan.renewal(view.name))
                for view in views
                if view.name in caller.accounts
            ]
        )
