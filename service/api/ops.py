"""Operations endpoints: liveness, readiness and metrics (no caller key; not in the schema)."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.plugins.prometheus import PrometheusController

from service.api.schemas import CheckBody, HealthBody, ReadinessBody, StoreTopologyBody
from service.api.security import CALLERS_STATE_KEY, CallerDirectory
from service.broker.runtime import BrokerRuntime


class OpsController(Controller):
    """Probes for Kubernetes and load balancers."""

    path = "/"
    include_in_schema = False

    @get("/healthz", operation_id="healthz")
    async def healthz(self) -> HealthBody:
        """The process is alive and serves HTTP."""
        return HealthBody(status="ok")

    @get("/readyz", operation_id="readyz")
    async def readyz(
        self, runtime: NamedDependency[BrokerRuntime], state: State
    ) -> Response[ReadinessBody]:
        """200 when this process can serve tokens, else 503; the body lists every check."""
        checks = [CheckBody(c.name, c.ok, c.detail) for c in await runtime.readiness()]
        callers: CallerDirectory = state[CALLERS_STATE_KEY]
        if callers.service_accounts is not None:
            # Fail closed: without the issuer's keys no ServiceAccount caller can be served.
            ok, detail = callers.service_accounts.keys.status()
            checks.append(CheckBody("service_account_keys", ok, detail))
        ready = all(check.ok for check in checks)
        survey = runtime.store_survey
        store = None
        if survey is not None:
            store = StoreTopologyBody(survey.kind, sorted(survey.masters), survey.nodes)
        body = ReadinessBody(ready, checks, store)
        return Response(body, status_code=200 if ready else 503)


class MetricsController(PrometheusController):
    """Prometheus exposition of the default registry, or of every worker's files in
    multiprocess mode (`PROMETHEUS_MULTIPROC_DIR`)."""

    include_in_schema = False
