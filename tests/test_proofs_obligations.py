"""Obligations read strictly, one table per type: what parses, into what, and what refuses.

A decision's obligations list is all or nothing: one unknown or malformed obligation makes
:func:`parse_all` answer None, and the decision denies.  The tables hold each field's
limits at the exact value (the TTL bounds, the 256-character reason, an empty field name).
"""

from __future__ import annotations

from typing import Any

import pytest

from vvault_pep.core.obligations import (
    MAX_TTL_S,
    TYPES,
    Carried,
    Quarantine,
    Redact,
    parse_all,
    parse_obligation,
    parse_one,
)
from vvault_pep.core.principal import SCOPES


def test_the_types_and_the_ttl_limit() -> None:
    assert MAX_TTL_S == 30 * 86_400
    assert set(TYPES) == {"quarantine", "redact"}
    assert isinstance(TYPES["quarantine"], Quarantine) and isinstance(TYPES["redact"], Redact)
    assert (Quarantine.name, Redact.name) == ("quarantine", "redact")


def test_carried_starts_empty_and_unshared() -> None:
    a, b = Carried(), Carried()
    assert (a.quarantines, a.redact) == ([], [])
    a.quarantines.append(("subject", 1.0, ""))
    a.redact.append("x")
    assert (b.quarantines, b.redact) == ([], [])


@pytest.mark.parametrize("scope", SCOPES)
def test_every_scope_with_the_defaults(scope: str) -> None:
    parsed = Quarantine().parse({"type": "quarantine", "scope": scope})
    assert parsed == (scope, 900.0, "")
    assert parsed is not None and type(parsed[1]) is float


@pytest.mark.parametrize(
    ("ttl", "parsed"),
    [
        (1, 1.0),
        (0.001, 0.001),
        (60.5, 60.5),
        (MAX_TTL_S, float(MAX_TTL_S)),
        (MAX_TTL_S - 0.5, MAX_TTL_S - 0.5),
        (0, None),
        (0.0, None),
        (-1, None),
        (MAX_TTL_S + 1, None),
        (MAX_TTL_S + 0.001, None),
        (True, None),
        (False, None),
        ("60", None),
        (None, None),
        ([60], None),
    ],
)
def test_the_ttl(ttl: Any, parsed: float | None) -> None:
    out = Quarantine().parse({"type": "quarantine", "scope": "device", "ttl_s": ttl})
    assert out == (None if parsed is None else ("device", parsed, ""))
    if out is not None:
        assert type(out[1]) is float


@pytest.mark.parametrize(
    ("reason", "kept"),
    [
        ("", ""),
        ("risk", "risk"),
        ("r" * 256, "r" * 256),
        ("r" * 257, "r" * 256),
        ("é" * 300, "é" * 256),
        (None, None),
        (7, None),
        (["risk"], None),
    ],
)
def test_the_reason(reason: Any, kept: str | None) -> None:
    out = Quarantine().parse({"type": "quarantine", "scope": "token", "ttl_s": 5, "reason": reason})
    assert out == (None if kept is None else ("token", 5.0, kept))


@pytest.mark.parametrize("scope", [None, "", "user", "Subject", "subject ", ["subject"], 1])
def test_an_unknown_scope(scope: Any) -> None:
    assert Quarantine().parse({"type": "quarantine", "scope": scope}) is None


def test_a_missing_scope() -> None:
    assert Quarantine().parse({"type": "quarantine", "ttl_s": 5}) is None


def test_quarantines_are_carried_in_order() -> None:
    carried = Carried()
    Quarantine().add(("subject", 1.0, "a"), carried)
    Quarantine().add(("subject", 1.0, "a"), carried)
    Quarantine().add(("device", 2.0, "b"), carried)
    assert carried.quarantines == [("subject", 1.0, "a"), ("subject", 1.0, "a"), ("device", 2.0, "b")]
    assert carried.redact == []


@pytest.mark.parametrize(
    ("fields", "parsed"),
    [
        (["value"], ("value",)),
        (["a", "b", "a"], ("a", "b", "a")),
        ([], None),
        (None, None),
        ("value", None),
        (("value",), None),
        ({"value": 1}, None),
        ([""], None),
        (["a", ""], None),
        (["a", 1], None),
        ([None], None),
        ([["a"]], None),
    ],
)
def test_redact_fields(fields: Any, parsed: tuple[str, ...] | None) -> None:
    assert Redact().parse({"type": "redact", "fields": fields}) == parsed


def test_redact_without_fields() -> None:
    assert Redact().parse({"type": "redact"}) is None


def test_redacted_fields_are_carried_once_each_in_order() -> None:
    carried = Carried()
    Redact().add(("a", "b", "a"), carried)
    Redact().add(("c", "b", "d"), carried)
    assert carried.redact == ["a", "b", "c", "d"]
    assert carried.quarantines == []


@pytest.mark.parametrize(
    "raw",
    [
        None,
        "quarantine",
        ["quarantine"],
        {},
        {"scope": "subject"},
        {"type": None, "scope": "subject"},
        {"type": 1},
        {"type": ["quarantine"], "scope": "subject"},
        {"type": "Quarantine", "scope": "subject"},
        {"type": "log"},
        {"type": "quarantine", "scope": "nobody"},
        {"type": "redact", "fields": []},
    ],
)
def test_parse_one_refuses(raw: Any) -> None:
    carried = Carried()
    assert parse_one(raw, carried) is False
    assert carried == Carried()


def test_parse_one_adds_what_it_parses() -> None:
    carried = Carried()
    assert parse_one({"type": "quarantine", "scope": "tenant", "ttl_s": 30, "reason": "r"}, carried) is True
    assert parse_one({"type": "redact", "fields": ["value"]}, carried) is True
    assert carried == Carried(quarantines=[("tenant", 30.0, "r")], redact=["value"])


@pytest.mark.parametrize("raw", [None, []])
def test_no_obligations(raw: Any) -> None:
    assert parse_all(raw) == Carried()


@pytest.mark.parametrize("raw", [{}, {"type": "redact", "fields": ["a"]}, "quarantine", 0, (), ({"type": "redact"},)])
def test_obligations_that_are_not_a_list(raw: Any) -> None:
    assert parse_all(raw) is None


def test_every_obligation_is_read_in_order() -> None:
    carried = parse_all(
        [
            {"type": "redact", "fields": ["value", "owner"]},
            {"type": "quarantine", "scope": "device", "ttl_s": 60, "reason": "stolen"},
            {"type": "quarantine", "scope": "subject"},
            {"type": "redact", "fields": ["owner", "notes"]},
        ]
    )
    assert carried == Carried(
        quarantines=[("device", 60.0, "stolen"), ("subject", 900.0, "")], redact=["value", "owner", "notes"]
    )


@pytest.mark.parametrize("bad", [{"type": "log"}, {"type": "quarantine", "scope": "device", "ttl_s": 0}, "x", None])
@pytest.mark.parametrize("at", [0, 1, 2])
def test_one_bad_obligation_anywhere_refuses_the_whole_list(bad: Any, at: int) -> None:
    good: list[Any] = [{"type": "redact", "fields": ["value"]}, {"type": "quarantine", "scope": "subject"}]
    assert parse_all([*good[:at], bad, *good[at:]]) is None


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ({"type": "quarantine", "scope": "workload", "ttl_s": 10, "reason": "x"}, ("workload", 10.0, "x")),
        ({"type": "quarantine", "scope": "certificate"}, ("certificate", 900.0, "")),
        ({"type": "quarantine", "scope": "workload", "ttl_s": 0}, None),
        ({"type": "redact", "fields": ["a"]}, None),
        ({"scope": "workload"}, None),
        ("quarantine", None),
        (None, None),
        ([{"type": "quarantine", "scope": "workload"}], None),
    ],
)
def test_parse_obligation(raw: Any, parsed: tuple[str, float, str] | None) -> None:
    assert parse_obligation(raw) == parsed
