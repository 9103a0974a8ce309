"""The input paths a policy reads: the cache key, derived from the policy itself.

``opa deps`` lists the base documents a query depends on; the ``input.*`` ones
are exactly what a decision can depend on.  They are computed per decision
path where the policy is known — by ``make bundle`` (shipped in the bundle as
``data.vvault_pep.input_paths``, tied to the bundle's revision) and by the PEP
itself when it starts a managed OPA from ``opa.policy_dir`` — and then:

* the default cache key of a route is exactly its decision path's input paths
  (a field the policy never reads, such as User-Agent or a query value, no
  longer splits the cache; a field it reads is always in the key);
* a route's hand-written ``cache.key`` that leaves out a path the policy reads
  is refused, with a message naming the path;
* a policy that reads ``input.time`` is time-dependent: the clock is never part
  of the key, and its answers are stored only for as long as the decision's own
  ``cache.ttl_s`` says (the shipped library ends it at the next grant expiry).

The document, as shipped and as pushed: ``{"revision": "<bundle revision>",
"paths": {"vvault/authz/decision": ["device.managed", ...]}}``.  Paths are dotted,
without the ``input.`` prefix, and a path covered by a shorter one is dropped.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

DATA_PATH = "vvault_pep/input_paths"
TIME = "time"


class DepsError(Exception):
    """``opa deps`` could not say what the policy reads."""


def input_paths(deps: Any) -> tuple[str, ...]:
    """The dotted input paths in ``opa deps --format json`` output, minimal and sorted."""
    found: set[str] = set()
    base = deps.get("base") if isinstance(deps, dict) else None
    for ref in base if isinstance(base, list) else []:
        if not isinstance(ref, list) or not ref or ref[0] != {"type": "var", "value": "input"}:
            continue
        parts: list[str] = []
        for term in ref[1:]:
            if not isinstance(term, dict) or term.get("type") != "string" or not isinstance(term.get("value"), str):
                break  # input.x[y]: everything under input.x may matter
            parts.append(term["value"])
        if not parts:
            return ("",)  # the whole input: nothing can be left out
        found.add(".".join(parts))
    return minimal(found)


def minimal(paths: Iterable[str]) -> tuple[str, ...]:
    """Drop every path that a shorter one in the set already covers."""
    ordered = sorted(set(paths))
    return tuple(p for p in ordered if not any(covers(q, p) for q in ordered if q != p))


def covers(prefix: str, path: str) -> bool:
    """``identity`` covers ``identity.subject``; ``identity.sub`` does not cover ``identity.subject``."""
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def compute(
    opa_binary: str, source: Path, decision_paths: Iterable[str], timeout_s: float = 60.0
) -> dict[str, list[str]]:
    """Run ``opa deps`` over ``source`` (a folder of policies and data) for each decision path."""
    out: dict[str, list[str]] = {}
    for path in sorted(set(decision_paths)):
        query = "data." + path.replace("/", ".")
        try:
            done = subprocess.run(
                [opa_binary, "deps", "--format", "json", "--ignore", "*_test.rego", "-d", str(source), query],
                capture_output=True,
                timeout=timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DepsError(f"cannot run opa deps: {exc}") from exc
        if done.returncode != 0:
            first = done.stderr.decode("utf-8", "replace").strip().splitlines()[:1]
            raise DepsError(f"opa deps {query} failed: {first[0] if first else done.returncode}")
        try:
            out[path] = list(input_paths(orjson.loads(done.stdout)))
        except orjson.JSONDecodeError as exc:
            raise DepsError(f"opa deps {query}: not JSON") from exc
    return out


def document(revision: str, paths: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    return {"revision": revision, "paths": {k: list(v) for k, v in sorted(paths.items())}}


def parse_document(doc: Any) -> tuple[str, dict[str, tuple[str, ...]]] | None:
    """(revision, paths) from a shipped document; None if it is not one (then: no derived keys)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("revision"), str) or not isinstance(doc.get("paths"), dict):
        return None
    paths: dict[str, tuple[str, ...]] = {}
    for decision, listed in doc["paths"].items():
        if not isinstance(decision, str) or not isinstance(listed, list) or not all(isinstance(p, str) for p in listed):
            return None
        paths[decision] = minimal(listed)
    return doc["revision"], paths


def key_problems(routes: Sequence[Any], paths: Mapping[str, Sequence[str]]) -> list[tuple[int, str]]:
    """Routes (index, message) whose hand-written ``cache.key`` leaves out a path their policy reads."""
    problems: list[tuple[int, str]] = []
    for i, route in enumerate(routes):
        key = route.cache.key
        read = paths.get(route.policy)
        if key is None or read is None or not route.cache.enabled:
            continue
        for path in read:
            if path == TIME or path.startswith(TIME + "."):
                continue  # the clock bounds the TTL instead (see the module docstring)
            if not any(covers(k, path) for k in key):
                where = f"routes[{i}] ({route.name}).cache.key"
                reader = "data." + route.policy.replace("/", ".")
                problems.append((i, f"{where} omits input.{path or '(all)'}, which {reader} reads"))
    return problems


def projection(doc: Mapping[str, Any], paths: Sequence[str]) -> dict[str, Any] | None:
    """``doc`` cut down to ``paths`` (plus ``version``): what OPA needs to decide.

    A path absent from ``doc`` stays absent; None when a path is the whole input.
    Only the dicts on the way are copied; the values are shared with ``doc``.
    """
    out: dict[str, Any] = {}
    for dotted in (*paths, "version"):
        if dotted == "":
            return None
        parts = dotted.split(".")
        src: Any = doc
        for part in parts:
            if not isinstance(src, dict) or part not in src:
                break
            src = src[part]
        else:
            dst = out
            for part in parts[:-1]:
                nxt = dst.get(part)
                if not isinstance(nxt, dict):
                    nxt = dst[part] = {}
                dst = nxt
            dst[parts[-1]] = src
    return out


def reads_time(paths: Sequence[str]) -> bool:
    return any(covers(p, TIME) or p.startswith(TIME + ".") for p in paths)


def key_paths(paths: Sequence[str]) -> tuple[str, ...]:
    """What goes in the key: every path read, except the clock."""
    return tuple(p for p in paths if not (p == TIME or p.startswith(TIME + ".")))
