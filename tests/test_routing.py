"""routing: templates compile at load and match decoded segments, first match wins."""

from __future__ import annotations

import pytest

from vvault_pep.config import Route
from vvault_pep.config.templates import TemplateError
from vvault_pep.core.routing import RouteTable
from vvault_pep.errors import PepError


def _route(name: str, path: str, methods: tuple[str, ...] = ("GET",), host: str | None = None) -> Route:
    return Route(name=name, path=path, methods=methods, upstream="u", policy="p/q", host=host)


TABLE = RouteTable(
    (
        _route("secret", "/v1/tenants/{tenant}/secrets/{path*}", ("GET", "PUT")),
        _route("tenant", "/v1/tenants/{tenant}"),
        _route("tenant_slash", "/v1/tenants/{tenant}/"),
        _route("internal", "/v1/internal", host="admin.example"),
        _route("wild", "/w", host="*.example"),
        _route("root", "/"),
    )
)


@pytest.mark.parametrize(
    ("host", "method", "segments", "trailing", "name", "params"),
    [
        (
            "h",
            "GET",
            ("v1", "tenants", "acme", "secrets", "a", "b"),
            False,
            "secret",
            {"tenant": "acme", "path": "a/b"},
        ),
        ("h", "PUT", ("v1", "tenants", "acme", "secrets", "a"), False, "secret", {"tenant": "acme", "path": "a"}),
        ("h", "GET", ("v1", "tenants", "acme"), False, "tenant", {"tenant": "acme"}),
        ("h", "GET", ("v1", "tenants", "acme"), True, "tenant_slash", {"tenant": "acme"}),
        ("admin.example", "GET", ("v1", "internal"), False, "internal", {}),
        ("a.example", "GET", ("w",), False, "wild", {}),
        ("h", "GET", (), False, "root", {}),
        ("h", "GET", ("v1", "tenants", "a b"), False, "tenant", {"tenant": "a b"}),
    ],
)
def test_matches(
    host: str, method: str, segments: tuple[str, ...], trailing: bool, name: str, params: dict[str, str]
) -> None:
    match = TABLE.match(host, method, segments, trailing)
    assert match.route.name == name
    assert match.params == params


@pytest.mark.parametrize(
    ("host", "method", "segments", "code"),
    [
        ("h", "GET", ("v1", "tenants", "acme", "secrets"), "route.not_found"),  # greedy needs one segment
        ("h", "GET", ("v1", "internal"), "route.not_found"),  # wrong host
        ("x.a.example", "GET", ("w",), "route.not_found"),  # wildcard is one label
        ("example", "GET", ("w",), "route.not_found"),
        ("h", "GET", ("v2",), "route.not_found"),
        ("h", "DELETE", ("v1", "tenants", "acme", "secrets", "a"), "route.method_not_allowed"),
    ],
)
def test_misses(host: str, method: str, segments: tuple[str, ...], code: str) -> None:
    with pytest.raises(PepError) as err:
        TABLE.match(host, method, segments, False)
    assert err.value.code == code


def test_405_lists_allowed_methods() -> None:
    with pytest.raises(PepError) as err:
        TABLE.match("h", "POST", ("v1", "tenants", "acme", "secrets", "a"), False)
    assert err.value.detail == "allowed: GET, PUT"


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("v1/x", "starts with '/'"),
        ("/a//b", "empty segment"),
        ("/a/../b", "dot segment"),
        ("/{a}/{a}", "appears twice"),
        ("/{rest*}/x", "last segment"),
        ("/{rest*}/", "trailing"),
        ("/a%2Fb", "literal"),
        ("/{bad-name}", "literal"),
    ],
)
def test_bad_templates(template: str, why: str) -> None:
    with pytest.raises(TemplateError, match=why):
        RouteTable.compile_one(_route("r", template))
