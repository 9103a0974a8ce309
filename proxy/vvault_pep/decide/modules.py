"""The policy modules OPA runs, from ``GET /v1/policies``, without their parsed AST.

Without bundles the PEP names OPA's revision by a hash of every module's id and source,
fetched every ``cache.policy_check_s``.  OPA sends each module's parsed AST along with its
source and has no way to leave it out: for the shipped library the listing is 483 KB, 475 KB
of it AST.  Decoding all of it builds a few hundred thousand objects only to drop them, holds
the event loop for several milliseconds and, on a PEP whose caches fill meanwhile, leaves
megabytes of fragmented allocator pools behind at each check.  msgspec decodes the listing
against the two fields the hash needs and skips the AST without building it.

Imported on first use: a PEP whose OPA runs bundles names the revision by the bundles' own
revisions and never lists the modules.
"""

from __future__ import annotations

import msgspec

from ..errors import PepError


class _Module(msgspec.Struct):
    id: str
    raw: str


class _Listing(msgspec.Struct):
    result: list[_Module] = []


_DECODER = msgspec.json.Decoder(_Listing)


def sources(listing: bytes) -> list[tuple[str, str]]:
    """``(id, source)`` of every module in the answer of ``GET /v1/policies``, sorted by id.

    Anything but an object whose ``result`` is a list of modules with a string ``id`` and
    ``raw`` is refused (``pdp.error``): no revision is named from a listing that was not read
    whole.
    """
    try:
        modules = _DECODER.decode(listing).result
    except msgspec.DecodeError as exc:
        raise PepError("pdp.error", f"GET /v1/policies: not a module listing ({exc})") from exc
    except RecursionError as exc:  # nested past msgspec's depth limit, even inside a skipped AST
        raise PepError("pdp.error", "GET /v1/policies: not a module listing (nested too deep)") from exc
    return sorted((m.id, m.raw) for m in modules)
