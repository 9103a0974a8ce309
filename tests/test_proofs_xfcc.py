"""XFCC, function by function: every refusal says exactly why, every accepted value is read exactly.

The values come from a trusted front proxy, but the proxy forwards what its
own client sent in Subject, URI and DNS: the parser must hold at every
corner.  Tables over parse/emit/trusted/forwarded_peer/accept with the
test PKI's real certificates; the reason a refusal gives reaches the client
in the problem body (``sanitize.bad_xfcc``), so it is compared exactly.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from vvault_pep.config import Xfcc
from vvault_pep.core.request import Connection, PeerCertificate, parse_peer
from vvault_pep.core.xfcc import Element, XfccError, _split, accept, emit, forwarded_peer, parse, trusted
from vvault_pep.errors import PepError

H1 = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
FRONT = "spiffe://demo.vvault/client/ops"


def peer_of(pki: Path, name: str) -> PeerCertificate:
    cert = x509.load_pem_x509_certificate((pki / f"{name}.pem").read_bytes())
    return parse_peer(cert.public_bytes(Encoding.DER), require_client_auth_eku=name != "server")


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (f'Hash={H1};Subject="CN=a', "unterminated quoted value"),
        (f'Hash={H1};Subject=a"b"c', "a quote inside an unquoted value"),
        (f"Hash={H1};Subject=a\\b", "a quote inside an unquoted value"),
        (f'Hash={H1};Subject="a"x"y"', "text after a quoted value"),
        (f'Hash={H1};Subject="a"x', "text after a quoted value"),
        (f"Hash={H1};Subject", "a pair without '='"),
        (f"Hash={H1};=x", "a pair without '='"),
        (f"Hash={H1};Hash={H1}", "Hash appears twice in one element"),
        (f"Hash={H1};Cert=a;Cert=b", "Cert appears twice in one element"),
        (f"Hash={H1};Subject=a;Subject=b", "Subject appears twice in one element"),
        ("Hash=abc", "Hash is not a hex SHA-256"),
        (",".join([f"Hash={H1}"] * 17), "too many elements"),
    ],
)
def test_a_malformed_value_says_why(value: str, why: str) -> None:
    with pytest.raises(XfccError) as refused:
        parse(value)
    assert str(refused.value) == why


def test_what_parse_accepts() -> None:
    assert len(parse(",".join([f"Hash={H1}"] * 16))) == 16  # the limit itself is fine
    assert parse(f'Hash={H1};Subject=""') == [Element(hash=H1, subject="")]
    assert parse(f"Future=1;Hash={H1}") == [Element(hash=H1)]  # an unknown key is skipped, not the end
    assert _split('"a,b",c', ",") == ['"a,b"', "c"]


def test_emit_quotes_what_needs_quoting_and_only_that(pki: Path) -> None:
    reader = peer_of(pki, "client-reader")
    base = f'Hash={reader.sha256};Subject="{reader.subject}";URI={reader.uri_sans[0]}'
    assert emit(reader, None) == base
    assert emit(reader, "spiffe://X/pep") == "By=spiffe://X/pep;" + base
    assert emit(reader, 'a"b\\c,d') == 'By="a\\"b\\\\c,d";' + base
    odd = PeerCertificate(
        'CN=a\\,b"c', "", None, ("x.example", "y;z"), (), None, H1, "x", "", "", "", reader.not_before, reader.not_after
    )
    value = emit(odd, None)
    assert value == f'Hash={H1};Subject="CN=a\\\\,b\\"c";DNS=x.example;DNS="y;z"'
    assert parse(value) == [Element(hash=H1, subject='CN=a\\,b"c', dns=("x.example", "y;z"))]


def test_a_front_proxy_by_certificate_thumbprint(pki: Path) -> None:
    ops = peer_of(pki, "client-ops")
    by_hash = Xfcc.model_validate({"trusted_proxies": [{"sha256": ops.sha256}]})
    assert trusted(by_hash, ops) is True
    assert trusted(Xfcc.model_validate({"trusted_proxies": [{"sha256": "0" * 64}]}), ops) is False
    assert trusted(Xfcc.model_validate({"trusted_proxies": [{"spiffe_id": "spiffe://demo.vvault/x"}]}), ops) is False


def test_forwarded_peer_refusals_say_why(pki: Path) -> None:
    ops = peer_of(pki, "client-ops")
    reader = peer_of(pki, "client-reader")
    pem = quote((pki / "client-reader.pem").read_text(), safe="")
    cases = [
        (Element(by=(FRONT,)), "the element has no Hash"),
        (Element(hash=H1), "the element has no By although the proxy has a URI SAN"),
        (Element(by=("spiffe://demo.vvault/other",), hash=H1), "By does not name the proxy that sent it"),
        (Element(by=(FRONT,), hash=H1, cert="not-a-pem"), "Cert is not a PEM certificate"),
        (Element(by=(FRONT,), hash=H1, cert=pem), "Cert does not match Hash"),
        (Element(by=(FRONT,), hash=H1, uri=("spiffe://a/x", "spiffe://b/y")), "more than one SPIFFE ID"),
    ]
    for element, why in cases:
        with pytest.raises(XfccError) as refused:
            forwarded_peer(element, ops, require_client_auth_eku=True)
        assert str(refused.value) == why, element
    # a forwarded certificate is held to the listener's own rules, its reason kept
    server = peer_of(pki, "server")
    spem = quote((pki / "server.pem").read_text(), safe="")
    with pytest.raises(XfccError) as refused:
        forwarded_peer(Element(by=(FRONT,), hash=server.sha256, cert=spem), ops, require_client_auth_eku=True)
    with pytest.raises(Exception) as direct:
        parse_peer(
            x509.load_pem_x509_certificate((pki / "server.pem").read_bytes()).public_bytes(Encoding.DER),
            require_client_auth_eku=True,
        )
    assert str(refused.value) == str(direct.value)
    relaxed = forwarded_peer(Element(by=(FRONT,), hash=server.sha256, cert=spem), ops, require_client_auth_eku=False)
    assert relaxed == server
    assert (
        forwarded_peer(Element(by=(FRONT,), hash=reader.sha256, cert=pem), ops, require_client_auth_eku=True) == reader
    )


@pytest.mark.parametrize(
    ("subject", "cn"),
    [("CN=reader,O=demo", "reader"), ("O=demo", None), ("not a name", None), (None, None), ("", None)],
)
def test_a_forwarded_subject_gives_its_common_name(pki: Path, subject: str | None, cn: str | None) -> None:
    ops = peer_of(pki, "client-ops")
    got = forwarded_peer(Element(by=(FRONT,), hash=H1, subject=subject), ops, require_client_auth_eku=True)
    assert (got.common_name, got.subject, got.spiffe_id, got.uri_sans) == (cn, subject or "", None, ())


def test_accept_reads_every_xfcc_line_from_a_trusted_proxy_only(pki: Path) -> None:
    ops = peer_of(pki, "client-ops")
    reader = peer_of(pki, "client-reader")
    cfg = Xfcc.model_validate({"trusted_proxies": [{"spiffe_id": FRONT}]})
    conn = Connection("TLSv1.3", "x", None, ops)
    # two header lines are one list of two elements: refused by default (a proxy that
    # appends would forward a client-written element), the last believed only when allowed
    lines = [
        (b"x-forwarded-client-cert", f"Hash={H1}".encode()),
        (b"X-Forwarded-Client-Cert", emit(reader, FRONT).encode()),
    ]
    with pytest.raises(PepError) as two:
        accept(cfg, conn, lines, require_client_auth_eku=True)
    assert two.value.code == "sanitize.bad_xfcc"
    appending = Xfcc.model_validate({"trusted_proxies": [{"spiffe_id": FRONT}], "require_single_element": False})
    seen = accept(appending, conn, lines, require_client_auth_eku=True)
    assert (seen.peer.sha256 if seen.peer else None, seen.forwarded_by) == (reader.sha256, ops)
    lines = lines[1:]  # what a SANITIZE_SET proxy sends: its own element only
    seen = accept(cfg, conn, lines, require_client_auth_eku=True)
    assert (seen.peer.sha256 if seen.peer else None, seen.forwarded_by) == (reader.sha256, ops)
    # no header from a trusted proxy: nobody is forwarded, the proxy is recorded
    assert accept(cfg, conn, [], require_client_auth_eku=True) == Connection("TLSv1.3", "x", None, None, ops)
    # without a peer or from anyone else: unchanged, the header never read
    bare = Connection("TLSv1.3", "x", None, None)
    assert accept(cfg, bare, lines, require_client_auth_eku=True) is bare
    other = Connection("TLSv1.3", "x", None, reader)
    assert accept(cfg, other, [(b"x-forwarded-client-cert", b"garbage")], require_client_auth_eku=True) is other
    # bytes that are not UTF-8 are not an exception: a refusal with its reason
    with pytest.raises(PepError) as refused:
        accept(cfg, conn, [(b"x-forwarded-client-cert", b"Hash=\xff")], require_client_auth_eku=True)
    assert (refused.value.code, refused.value.detail) == (
        "sanitize.bad_xfcc",
        "x-forwarded-client-cert from the front proxy: Hash is not a hex SHA-256",
    )
    # the listener's EKU rule reaches a forwarded certificate
    server = peer_of(pki, "server")
    spem = quote((pki / "server.pem").read_text(), safe="")
    with pytest.raises(PepError):
        accept(
            cfg,
            conn,
            [(b"x-forwarded-client-cert", f"By={FRONT};Hash={server.sha256};Cert={spem}".encode())],
            require_client_auth_eku=True,
        )
