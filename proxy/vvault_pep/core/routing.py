"""Routing: a declarative table, matched on the canonical path only.

A template is a ``/``-separated list of segments: a literal (``secrets``), a
named parameter matching exactly one segment (``{tenant}``), or, last only, a
greedy parameter matching one or more segments (``{path*}``).  Matching is on
the *decoded* segments of the canonical path, so ``/v1/%74enants`` and
``/v1/tenants`` are the same route and a parameter never holds a ``/`` it did
not get from a real separator (``%2F`` is refused by sanitize).

Routes are tried in table order; the first route whose host, path and method
match wins.  No match → 404; a path that matches only with another method →
405 with ``Allow``.  There is no default route and no default upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.models import Route
from ..config.templates import Segment, parse_template
from ..errors import PepError


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    route: Route
    segments: tuple[Segment, ...]
    trailing_slash: bool

    def match(self, segments: tuple[str, ...], trailing: bool) -> dict[str, str] | None:
        if trailing != self.trailing_slash:
            return None
        params: dict[str, str] = {}
        n = len(segments)
        for i, seg in enumerate(self.segments):
            if seg.greedy:
                rest = segments[i:]
                if not rest:
                    return None
                assert seg.param is not None
                params[seg.param] = "/".join(rest)
                return params
            if i >= n:
                return None
            if seg.literal is not None:
                if segments[i] != seg.literal:
                    return None
            else:
                assert seg.param is not None
                params[seg.param] = segments[i]
        return params if n == len(self.segments) else None


@dataclass(frozen=True, slots=True)
class Match:
    route: Route
    params: dict[str, str]


class RouteTable:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        self._routes = tuple(self.compile_one(r) for r in routes)

    @staticmethod
    def compile_one(route: Route) -> CompiledRoute:
        segments, trailing = parse_template(route.path)
        return CompiledRoute(route, segments, trailing)

    def match(self, host: str, method: str, segments: tuple[str, ...], trailing: bool) -> Match:
        allowed: list[str] = []
        for compiled in self._routes:
            route = compiled.route
            if route.host is not None and not _host_matches(route.host, host):
                continue
            params = compiled.match(segments, trailing)
            if params is None:
                continue
            if method not in route.methods:
                allowed.extend(m for m in route.methods if m not in allowed)
                continue
            return Match(route, params)
        if allowed:
            raise PepError("route.method_not_allowed", f"allowed: {', '.join(allowed)}", allow_methods=tuple(allowed))
        raise PepError("route.not_found", "no route matches this host and path")


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return host.endswith(suffix) and "." not in host[: -len(suffix)] and len(host) > len(suffix)
    return host == pattern
