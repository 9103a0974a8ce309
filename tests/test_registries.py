"""The registries: obligation types, identity sources, L2 stores — adding one is a class and a line.

* obligation types (``core/obligations.py`` ``TYPES``): the PEP's are ``quarantine`` and
  ``redact``; a type registered there is accepted (strictly parsed, a malformed one denies), and
  the same obligation unregistered makes the allow ``enforce.unsupported_obligation``;
* identity sources (``identity/authn.py`` ``SOURCES``): the bearer token, then the workload
  certificate; a source added to the list contributes to the identity the route's
  requirements are checked against, and a source that refuses ends the walk with its code;
* L2 stores (``decide/store.py`` ``STORES``): ``redis`` and ``memory`` by name.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, cast

import pytest

from vvault_pep.config.models import Identity as IdentityConfig
from vvault_pep.config.models import RouteAuthn
from vvault_pep.core import obligations
from vvault_pep.core.decision import interpret
from vvault_pep.core.principal import Workload
from vvault_pep.decide.store import STORES, MemoryStore, RedisStore, store_named
from vvault_pep.errors import PepError
from vvault_pep.identity import authn
from vvault_pep.shared.state import SharedState


class Notify:
    """A made-up obligation type: ``{"type": "notify", "channel": str}``."""

    name: ClassVar[str] = "notify"

    def parse(self, raw: dict[str, Any]) -> str | None:
        channel = raw.get("channel")
        return channel if isinstance(channel, str) and channel else None

    def add(self, parsed: str, carried: obligations.Carried) -> None:
        pass


def test_the_pep_carries_out_quarantine_and_redact() -> None:
    assert sorted(obligations.TYPES) == ["quarantine", "redact"]


def test_a_registered_obligation_type_is_parsed_strictly(monkeypatch: pytest.MonkeyPatch) -> None:
    ob = {"allow": True, "obligations": [{"type": "notify", "channel": "soc"}]}
    assert interpret(ob, defined=True).code == "enforce.unsupported_obligation"
    monkeypatch.setitem(obligations.TYPES, "notify", Notify())
    allowed = interpret(ob, defined=True)
    assert (allowed.allow, allowed.code, allowed.obligations, allowed.redact) == (True, "policy.allowed", (), ())
    bad = interpret({"allow": True, "obligations": [{"type": "notify", "channel": 7}]}, defined=True)
    assert (bad.allow, bad.status, bad.code) == (False, 403, "enforce.unsupported_obligation")


def test_obligation_types_fill_the_decision_in_the_policy_order() -> None:
    d = interpret(
        {
            "allow": True,
            "obligations": [
                {"type": "redact", "fields": ["owner"]},
                {"type": "quarantine", "scope": "subject", "ttl_s": 60, "reason": "r"},
                {"type": "redact", "fields": ["value", "owner"]},
            ],
        },
        defined=True,
    )
    assert d.allow and d.obligations == (("subject", 60.0, "r"),) and d.redact == ("owner", "value")


class Fixed:
    """A made-up identity source: every caller is one workload."""

    name: ClassVar[str] = "fixed"

    def __init__(self, _authn: authn.Authenticator) -> None:
        pass

    async def authenticate(self, creds: authn.Credentials, found: authn.Found) -> None:
        found.workload = Workload("spiffe://corp.example/batch", "corp.example", "/batch")


class Refuses:
    name: ClassVar[str] = "refuses"

    def __init__(self, _authn: authn.Authenticator) -> None:
        pass

    async def authenticate(self, creds: authn.Credentials, found: authn.Found) -> None:
        raise PepError("authn.required", "refused by the test source")


def test_bearer_runs_before_workload() -> None:
    names = [s.name for s in authn.Authenticator(IdentityConfig()).sources]
    assert names == ["bearer", "workload"]


async def test_a_registered_source_contributes_to_the_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    need = RouteAuthn(require="workload")
    with pytest.raises(PepError) as refused:
        await authn.Authenticator(IdentityConfig()).authenticate(None, (), None, need)
    assert refused.value.code == "authn.untrusted_workload"
    monkeypatch.setattr(authn, "SOURCES", (*authn.SOURCES, Fixed))
    identity = await authn.Authenticator(IdentityConfig()).authenticate(None, (), None, need)
    assert identity.workload is not None and identity.workload.path == "/batch"
    assert identity.user is None


async def test_sources_run_in_order_and_the_first_refusal_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(authn, "SOURCES", (*authn.SOURCES, Refuses))
    pep = authn.Authenticator(IdentityConfig())
    with pytest.raises(PepError) as malformed:
        await pep.authenticate("Bearer not a token", (), None, RouteAuthn(require="none"))
    assert malformed.value.code == "authn.malformed"
    with pytest.raises(PepError) as refused:
        await pep.authenticate(None, (), None, RouteAuthn(require="none"))
    assert refused.value.code == "authn.required"


async def test_l2_stores_by_name() -> None:
    assert sorted(STORES) == ["memory", "redis"]
    shared = cast(SharedState, object())
    assert isinstance(store_named("redis", shared), RedisStore)
    memory = store_named("memory", shared)
    assert isinstance(memory, MemoryStore)
    await memory.put("dec", "k", b"blob", time.time() + 60)
    assert await memory.get("dec", "k") == b"blob"
    with pytest.raises(KeyError):
        store_named("memcached", shared)
