"""SPIFFE IDs at the edges: each refusal with its reason, the length limit at the exact byte."""

from __future__ import annotations

import pytest

from vvault_pep.core.spiffe import MAX_LEN, InvalidSpiffeId, SpiffeId, parse_spiffe_id


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("spiffe://td/" + "a" * (MAX_LEN - 11), "longer than 2048 bytes"),
        ("spiffe://td/" + "é" * 1019, "longer than 2048 bytes"),  # 2050 bytes, 1031 characters
        ("spiffe:/td/a", "scheme must be 'spiffe' in lower case"),
        ("Spiffe://td/a", "scheme must be 'spiffe' in lower case"),
        ("xspiffe://td/a", "scheme must be 'spiffe' in lower case"),
        ("spiffe://td/a?", "no query or fragment allowed"),
        ("spiffe://td?/a", "no query or fragment allowed"),
        ("spiffe://td/a#", "no query or fragment allowed"),
        ("spiffe:///a", "empty trust domain"),
        ("spiffe://", "empty trust domain"),
        ("spiffe://TD/a", "trust domain has a character outside [a-z0-9._-] (port, userinfo, upper case?)"),
        ("spiffe://td:1/a", "trust domain has a character outside [a-z0-9._-] (port, userinfo, upper case?)"),
        ("spiffe://td", "a workload SPIFFE ID has a path"),
        ("spiffe://td/", "a workload SPIFFE ID has a path"),
        ("spiffe://td//a", "empty, '.' or '..' path segment"),
        ("spiffe://td/a/", "empty, '.' or '..' path segment"),
        ("spiffe://td/.", "empty, '.' or '..' path segment"),
        ("spiffe://td/a/..", "empty, '.' or '..' path segment"),
        ("spiffe://td/a b", "path segment has a character outside [A-Za-z0-9._-]"),
        ("spiffe://td/a%41", "path segment has a character outside [A-Za-z0-9._-]"),
        ("spiffe://td/a/b:c", "path segment has a character outside [A-Za-z0-9._-]"),
    ],
)
def test_refusals_name_their_reason(text: str, reason: str) -> None:
    with pytest.raises(InvalidSpiffeId) as err:
        parse_spiffe_id(text)
    assert str(err.value) == reason


def test_exactly_2048_bytes_is_accepted() -> None:
    text = "spiffe://td/" + "a" * (MAX_LEN - 12)
    assert len(text.encode()) == MAX_LEN == 2048
    assert parse_spiffe_id(text).path == "/" + "a" * (MAX_LEN - 12)


@pytest.mark.parametrize(
    ("text", "domain", "path"),
    [
        ("spiffe://td/a", "td", "/a"),
        ("spiffe://a.b-c_9/x/y.z/..a/.b", "a.b-c_9", "/x/y.z/..a/.b"),
        ("spiffe://td/Z_09-", "td", "/Z_09-"),
    ],
)
def test_accepted(text: str, domain: str, path: str) -> None:
    sid = parse_spiffe_id(text)
    assert sid == SpiffeId(domain, path)
    assert str(sid) == text
