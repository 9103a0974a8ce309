"""Path templates: compiled when the config loads, so a bad one fails with its line.

A template is a ``/``-separated list of segments: a literal (``secrets``), a named parameter
matching exactly one segment (``{tenant}``), or, last only, a greedy parameter matching one or
more segments (``{path*}``).  Matching them against a request is :mod:`..core.routing`'s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(\*?)\}$")
_LITERAL = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@]+$")


class TemplateError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Segment:
    literal: str | None  # None for a parameter
    param: str | None
    greedy: bool


def parse_template(template: str) -> tuple[tuple[Segment, ...], bool]:
    """The segments of ``template`` and whether it ends in ``/``; TemplateError if malformed."""
    if not template.startswith("/"):
        raise TemplateError("a path template starts with '/'")
    trailing = template.endswith("/") and template != "/"
    parts = [p for p in template.strip("/").split("/")] if template.strip("/") else []
    segments: list[Segment] = []
    names: set[str] = set()
    for i, part in enumerate(parts):
        if part == "":
            raise TemplateError("empty segment ('//') in path template")
        if part in (".", ".."):
            raise TemplateError("dot segment in path template")
        m = _PARAM.fullmatch(part)
        if m:
            name, greedy = m.group(1), bool(m.group(2))
            if name in names:
                raise TemplateError(f"parameter {{{name}}} appears twice")
            if greedy and i != len(parts) - 1:
                raise TemplateError(f"greedy parameter {{{name}*}} must be the last segment")
            if greedy and trailing:
                raise TemplateError("a template ending in a greedy parameter has no trailing '/'")
            names.add(name)
            segments.append(Segment(None, name, greedy))
        elif _LITERAL.fullmatch(part):
            segments.append(Segment(part, None, False))
        else:
            raise TemplateError(f"segment {part!r} must be a literal or {{name}} / {{name*}}")
    return tuple(segments), trailing
