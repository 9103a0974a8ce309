"""The obligation types a decision may carry, one class each, registered in :data:`TYPES`.

An obligation is an object ``{"type": name, ...}`` in the decision's ``obligations`` list.  Its
type's :meth:`~ObligationType.parse` reads it strictly: an unknown type, or a known one that is
malformed, makes the whole list unparseable (:func:`parse_all` returns None), and the decision
then denies (``enforce.unsupported_obligation`` on an allow).  A parsed obligation is added to
:class:`Carried`, which becomes the decision's fields that the stages carry out:

* ``quarantine`` → ``Decision.obligations`` (``(scope, ttl_s, reason)``), carried out by the
  pipeline's obligations stage (``app/stages.py``), on an allow and on a deny;
* ``redact`` → ``Decision.redact`` (field names), removed from the JSON answer by the forwarder,
  on an allow only.

Adding a type is a class here and a line in :data:`TYPES`, then its carry-out where it acts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from .principal import SCOPES

MAX_TTL_S = 30 * 86_400


@dataclass(slots=True)
class Carried:
    """What the decision's obligations ask for, in the order the policy gave them."""

    quarantines: list[tuple[str, float, str]] = field(default_factory=list)
    redact: list[str] = field(default_factory=list)


class ObligationType(Protocol):
    name: ClassVar[str]

    def parse(self, raw: dict[str, Any]) -> Any | None:
        """The obligation's parsed form, or None if it is malformed."""
        ...

    def add(self, parsed: Any, carried: Carried) -> None:
        """Put the parsed obligation where its carry-out reads it."""
        ...


class Quarantine:
    """``{"type": "quarantine", "scope", "ttl_s"?: 900, "reason"?}``: contain a verified scope."""

    name: ClassVar[str] = "quarantine"

    def parse(self, raw: dict[str, Any]) -> tuple[str, float, str] | None:
        scope, ttl, reason = raw.get("scope"), raw.get("ttl_s", 900), raw.get("reason", "")
        if scope not in SCOPES or not isinstance(reason, str):
            return None
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_TTL_S:
            return None
        return scope, float(ttl), reason[:256]

    def add(self, parsed: tuple[str, float, str], carried: Carried) -> None:
        carried.quarantines.append(parsed)


class Redact:
    """``{"type": "redact", "fields": [name, ...]}``: remove JSON fields from the answer."""

    name: ClassVar[str] = "redact"

    def parse(self, raw: dict[str, Any]) -> tuple[str, ...] | None:
        fields = raw.get("fields")
        if not isinstance(fields, list) or not fields or not all(isinstance(f, str) and f for f in fields):
            return None
        return tuple(fields)

    def add(self, parsed: tuple[str, ...], carried: Carried) -> None:
        # One loop, not extend() over a generator: whether the generator sees the items
        # extend() already appended differs between CPython and the compiled module.
        for f in parsed:
            if f not in carried.redact:
                carried.redact.append(f)


# The obligation types this PEP carries out, the one list.
TYPES: dict[str, ObligationType] = {t.name: t for t in (Quarantine(), Redact())}


def parse_one(raw: Any, carried: Carried) -> bool:
    """Parse one obligation into ``carried``; False if its type is unknown or it is malformed."""
    if not isinstance(raw, dict):
        return False
    kind = raw.get("type")
    otype = TYPES.get(kind) if isinstance(kind, str) else None
    if otype is None:
        return False
    parsed = otype.parse(raw)
    if parsed is None:
        return False
    otype.add(parsed, carried)
    return True


def parse_all(raw: Any) -> Carried | None:
    """Every obligation of a decision's list; None if any is unknown or malformed."""
    carried = Carried()
    if raw is None or raw == []:
        return carried
    if not isinstance(raw, list):
        return None
    for item in raw:
        if not parse_one(item, carried):
            return None
    return carried


def parse_obligation(raw: Any) -> tuple[str, float, str] | None:
    """``(scope, ttl_s, reason)`` of a well-formed quarantine obligation, else None."""
    if not isinstance(raw, dict) or raw.get("type") != Quarantine.name:
        return None
    return Quarantine().parse(raw)
