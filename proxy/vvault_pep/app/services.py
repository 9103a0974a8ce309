"""The services a running PEP holds, as the admin API sees them; the pieces the runtime and
``explain`` build alike (so they cannot drift); acts that need several services.

:class:`~.runtime.PepRuntime` builds them once at start; the admin API reads them through
this protocol, so it depends on what it uses and not on the runtime that builds it.  ``None``
means the service has not started yet (or is not configured).
"""

from __future__ import annotations

from typing import Protocol

from ..config.models import Config
from ..decide import revision
from ..decide.cache import DecisionCache
from ..decide.pdp import PdpClient
from ..edge.opa_supervisor import OpaSupervisor
from ..identity.authn import Authenticator
from ..observe.audit import AuditLog
from ..shared.containment import Containment, Quarantine


class Services(Protocol):
    @property
    def config(self) -> Config: ...
    @property
    def pdp(self) -> PdpClient | None: ...
    @property
    def authn(self) -> Authenticator | None: ...
    @property
    def audit(self) -> AuditLog | None: ...
    @property
    def cache(self) -> DecisionCache | None: ...
    @property
    def containment(self) -> Containment | None: ...


def policy_client(config: Config) -> tuple[PdpClient, OpaSupervisor | None]:
    """The OPA client, and the managed OPA when the config says so (not started yet).

    A managed OPA is asked at its own address (a private socket by default), never opa.url.
    """
    if config.opa.managed:
        supervisor = OpaSupervisor(config.opa)
        pdp = PdpClient(config.opa, url=supervisor.url)
        supervisor.client = pdp
        return pdp, supervisor
    return PdpClient(config.opa), None


async def key_decisions(
    config: Config, pdp: PdpClient, cache: DecisionCache, derived: dict[str, tuple[str, ...]] | None
) -> None:
    """Teach the cache what OPA runs (its instance, its revision) and what the policies read.

    Those are the cache key's inputs beside the request: the runtime at start and ``explain``
    learn them the same way, so ``explain`` prints the key a live request uses.
    """
    cache.opa_instance = await pdp.instance_id()
    await revision.refresh(config, pdp, cache)
    if derived is not None:
        cache.use_policy_paths(derived, cache.opa_revision)


async def quarantine(
    containment: Containment, cache: DecisionCache, scope: str, value: str, ttl_s: float, reason: str, *, by: str
) -> tuple[Quarantine, bool]:
    """Quarantine a scope everywhere, then end every cached answer for it; whether Redis shared it.

    The one place for both steps, whoever asks: the admin API, a revocation, a decision's
    obligation.
    """
    q, shared = await containment.add(scope, value, ttl_s, reason, by=by)
    await cache.invalidate(q.scope, q.value)
    return q, shared
