"""Operator actions on an account, for admin callers: verify its credentials, reset its
back-off. Each request writes one audit line (docs/operations.md, "The audit log"), refusals
included, and one line in the application log; never a secret."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Controller, Request, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from service.api.auditing import audit_action, requires_audited_admin
from service.api.problems import problem_responses
from service.api.schemas import AccountBody, VerifiedBody
from service.api.security import Caller
from service.audit import AuditOutcome
from service.broker import BrokerError, CredentialsStatus
from service.broker.core import TokenBroker
from service.broker.model import NoSuchAccountError
from service.broker.runtime import BrokerRuntime

log = logging.getLogger(__name__)

VERIFY_EVENT = "account.verify"
RESET_EVENT = "account.reset"

_ADMIN_DESCRIPTIONS = {
    403: "`forbidden`: the caller is not configured with `admin: true`.",
    404: "`not_found`: no account of that name is configured.",
    503: "`upstream_unavailable`: the shared auth budget, Monogoto or the token store cannot "
    "answer now; `Retry-After` set.",
}

_Request = Request[Any, Any, Any]


def _configured(broker: TokenBroker, account: str) -> None:
    # Admins may list every account anyway: an unknown name is a plain 404 for them.
    if account not in broker.names:
        raise NoSuchAccountError(f"No account named {account!r} is configured.")


class AccountActionController(Controller):
    """What an operator may do to an account besides reading its state."""

    path = "/accounts/{account:str}"
    tags = ("operator actions",)

    @post(
        "/verify",
        operation_id="verifyAccountCredentials",
        summary="Log in with the account's configured credentials now",
        status_code=200,
        responses=problem_responses(401, 403, 404, 503, descriptions=_ADMIN_DESCRIPTIONS),
        # On the route, not the controller: the route's OPTIONS (answered by Litestar) stays
        # open, as on every other route.
        guards=[requires_audited_admin],
        opt={"audit_event": VERIFY_EVENT},
    )
    async def verify(
        self,
        request: _Request,
        account: FromPath[str],
        caller: NamedDependency[Caller],
        broker: NamedDependency[TokenBroker],
    ) -> VerifiedBody:
        """One login within the shared auth budget, under the account's lock (a renewal in
        flight is waited for, and a login it makes with these credentials counts).
        `credentials` is `verified` or `rejected`; a rejection in force is reported without
        asking Monogoto again (reset it first to retry now)."""
        _configured(broker, account)
        try:
            verified = await broker.verify(account)
        except BrokerError as error:
            _audited(request, VERIFY_EVENT, caller, account, AuditOutcome.FAILED, error=error)
            raise
        accepted = verified.credentials is CredentialsStatus.VERIFIED
        outcome = AuditOutcome.VERIFIED if accepted else AuditOutcome.REJECTED
        _audited(request, VERIFY_EVENT, caller, account, outcome)
        return VerifiedBody(verified.account, verified.credentials, verified.detail)

    @post(
        "/reset",
        operation_id="resetAccount",
        summary="Clear the account's rejection and back-off in every replica",
        status_code=200,
        responses=problem_responses(401, 403, 404, 503, descriptions=_ADMIN_DESCRIPTIONS),
        guards=[requires_audited_admin],
        opt={"audit_event": RESET_EVENT},
    )
    async def reset(
        self,
        request: _Request,
        account: FromPath[str],
        caller: NamedDependency[Caller],
        runtime: NamedDependency[BrokerRuntime],
    ) -> AccountBody:
        """Forgets the account's credentials-rejected marker in the store and every replica's
        rejection and back-off of it, so the next renewal may call Monogoto at once (within the
        shared budget). Idempotent. Answers the account's state in this process."""
        broker = runtime.broker
        _configured(broker, account)
        try:
            await broker.reset(account)
        except BrokerError as error:
            _audited(request, RESET_EVENT, caller, account, AuditOutcome.FAILED, error=error)
            raise
        _audited(request, RESET_EVENT, caller, account, AuditOutcome.RESET)
        [view] = [view for view in broker.accounts() if view.name == account]
        return AccountBody.of(view, runtime.capacity.renewal(account))


def _audited(
    request: _Request,
    event: str,
    caller: Caller,
    account: str,
    outcome: AuditOutcome,
    *,
    error: BrokerError | None = None,
) -> None:
    """The action's audit line, then its application log line."""
    audit_action(request, caller, account, event, outcome, error=error)
    accepted = outcome in (AuditOutcome.VERIFIED, AuditOutcome.RESET)
    log.log(
        logging.INFO if accepted else logging.WARNING,
        "operator action",
        extra={
            "event": event,
            "caller": caller.name,
            "account": account,
            "outcome": outcome if error is None else error.code,
        },
    )
