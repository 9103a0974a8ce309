"""Which policy revision OPA runs, and which input paths its policies read: the cache key's inputs.

Asked at start and then every ``cache.revision_check_s`` by the runtime, and once by
``explain``, so both key a decision the same way.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from ..config.models import Config
from ..errors import PepError
from . import deps
from .cache import DecisionCache
from .pdp import PdpClient

log = logging.getLogger("vvault_pep.runtime")


async def managed_policy_paths(config: Config) -> dict[str, tuple[str, ...]]:
    """What the managed OPA's policies read, per decision path; routes whose key omits a path refuse to start."""
    if config.opa.policy_dir is None:
        raise RuntimeError("opa.policy_dir is not set")
    try:
        found = await asyncio.to_thread(
            deps.compute, config.opa.binary, config.opa.policy_dir, {r.policy for r in config.routes}
        )
    except deps.DepsError as exc:
        raise RuntimeError(str(exc)) from exc
    problems = deps.key_problems(config.routes, found)
    if problems:
        raise RuntimeError("; ".join(message for _, message in problems))
    return {k: tuple(v) for k, v in found.items()}


async def shipped_policy_paths(config: Config, pdp: PdpClient, cache: DecisionCache) -> None:
    """The bundle's own input paths (data.vvault_pep.input_paths), when they are for the running revision."""
    revision = cache.opa_revision
    if not revision.startswith("b:") or cache.paths_revision == revision:
        return
    try:
        shipped = deps.parse_document(await pdp.get_data(deps.DATA_PATH))
    except PepError as err:
        log.warning("cannot read the bundle's input paths (%s)", err.code)
        return
    try:
        running = set(orjson.loads(revision[2:]).values())
    except orjson.JSONDecodeError:
        running = set()
    if shipped is None or shipped[0] not in running:
        # None shipped, or not for this revision: whole-input keys, which are never wrong.
        cache.forget_policy_paths()
        return
    problems = deps.key_problems(config.routes, shipped[1])
    for _, message in problems:
        log.error("bundle %s: %s; the route is not cached under this revision", shipped[0], message)
    refused = frozenset(config.routes[i].name for i, _ in problems)
    cache.use_policy_paths(shipped[1], revision, refused)


async def refresh(config: Config, pdp: PdpClient, cache: DecisionCache, *, modules: bool = True) -> None:
    """Learn the revision OPA runs now (and, for a bundle, the input paths it ships)."""
    try:
        current = cache.opa_revision
        # The module hash is fetched when asked, and whenever there is no module hash to keep.
        revision = await pdp.revision(modules=modules or not current.startswith("p:"))
        if revision is None or not revision.startswith("b:"):
            # A restarted OPA has lost what was pushed to it: it gets a new name, and
            # every key with it.
            instance = await pdp.instance_id()
            if revision is None and instance != cache.opa_instance:
                revision = await pdp.revision()  # and may run other modules: hash them again
            if instance != cache.opa_instance:
                cache.opa_instance = instance
                cache.gen.bump()
        if revision is not None:
            cache.opa_revision = revision  # moves the generation when it changes
        await shipped_policy_paths(config, pdp, cache)
    except PepError as err:
        # Unknown revision: keep the last one; decisions still go to OPA on a miss.
        log.warning("cannot read OPA's policy revision (%s)", err.code)
