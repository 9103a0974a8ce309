"""SPIFFE ID rules (the SPIFFE ID specification), as a table."""

from __future__ import annotations

import pytest

from vvault_pep.core.spiffe import InvalidSpiffeId, parse_spiffe_id


@pytest.mark.parametrize(
    ("text", "domain", "path"),
    [
        ("spiffe://demo.vvault/client/reader", "demo.vvault", "/client/reader"),
        ("spiffe://prod_1-a.example/ns/default/sa/api", "prod_1-a.example", "/ns/default/sa/api"),
        ("spiffe://td/A.b-c_D", "td", "/A.b-c_D"),
    ],
)
def test_valid(text: str, domain: str, path: str) -> None:
    sid = parse_spiffe_id(text)
    assert (sid.trust_domain, sid.path, str(sid)) == (domain, path, text)


@pytest.mark.parametrize(
    "text",
    [
        "SPIFFE://demo.vvault/a",  # scheme is lower case
        "https://demo.vvault/a",
        "spiffe://Demo.vvault/a",  # trust domain is lower case
        "spiffe://demo.vvault:8443/a",  # no port
        "spiffe://user@demo.vvault/a",  # no userinfo
        "spiffe:///a",  # empty trust domain
        "spiffe://demo.vvault",  # a workload ID has a path
        "spiffe://demo.vvault/",
        "spiffe://demo.vvault/a//b",
        "spiffe://demo.vvault/a/./b",
        "spiffe://demo.vvault/a/../b",
        "spiffe://demo.vvault/a?x=1",
        "spiffe://demo.vvault/a#frag",
        "spiffe://demo.vvault/a%2Fb",  # no percent-encoding
        "spiffe://demo.vvault/caf\u00e9",
        "spiffe://demo.vvault/" + "a" * 2048,  # over 2048 bytes
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidSpiffeId):
        parse_spiffe_id(text)
