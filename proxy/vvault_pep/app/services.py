"""The services a running PEP holds, as the admin API sees them; acts that need several.

:class:`~.runtime.PepRuntime` builds them once at start; the admin API reads them through
this protocol, so it depends on what it uses and not on the runtime that builds it.  ``None``
means the service has not started yet (or is not configured).
"""

from __future__ import annotations

from typing import Protocol

from ..config.models import Config
from ..decide.cache import DecisionCache
from ..decide.pdp import PdpClient
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
