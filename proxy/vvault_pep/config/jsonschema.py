"""A JSON Schema for ``pep.yaml``, generated from the config models.

    python -m vvault_pep.config.jsonschema                          # print it
    python -m vvault_pep.config.jsonschema --output docs/pep.schema.json   # what `make schema` runs

The committed copy (``docs/pep.schema.json``) is what editors read: the example configs
name it in a ``# yaml-language-server: $schema=…`` comment, so keys complete and typos
are underlined before the PEP ever loads the file.  A test regenerates it and compares.

The models stay the one source of truth; this module only adds what the loader accepts
beyond them: ``${ENV}`` / ``${ENV:-default}`` / ``${file:…}`` in place of any number,
boolean or constrained string (interpolation happens before validation), ``cache: off`` on a route, and each
field's comment in ``config/models.py`` as its description.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import sys
import tokenize
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from . import models as config

SCHEMA_ID = "https://vvault-pep.dev/schemas/pep.schema.json"
# A whole-value reference, interpolated by the loader before validation (see config/loader.py).
ENV_REF = r"^\$\{(file:[^}]+|[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?)\}$"
_SCALARS = {"integer", "number", "boolean"}
_STRING_CHECKS = ("enum", "const", "pattern", "minLength", "maxLength")
_VALUES = {"default", "const", "enum", "examples"}  # data, not schemas: left as they are


def _comments(cls: type[BaseModel]) -> dict[str, str]:
    """Field name → the comment on its line, else the comment lines just above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    code_lines = {n.lineno for n in ast.walk(ast.parse(source)) if isinstance(n, ast.stmt)}
    out: dict[str, str] = {}
    body = ast.parse(source).body[0]
    assert isinstance(body, ast.ClassDef)
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if node.lineno in by_line:
            out[node.target.id] = by_line[node.lineno]
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line in by_line and line not in code_lines:
            above.insert(0, by_line[line])
            line -= 1
        if above:
            out[node.target.id] = " ".join(above)
    return out


def _models() -> dict[str, type[BaseModel]]:
    return {
        name: obj
        for name, obj in vars(config).items()
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == config.__name__
    }


def _allow_env_refs(node: Any) -> Any:
    """Every number, boolean or constrained string may also be a whole ``${…}`` reference."""
    if isinstance(node, list):
        return [_allow_env_refs(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {k: v if k in _VALUES else _allow_env_refs(v) for k, v in node.items()}
    kind = node.get("type")
    constrained = kind == "string" and any(k in node for k in _STRING_CHECKS)
    if isinstance(kind, str) and (kind in _SCALARS or constrained):
        outer = {k: node.pop(k) for k in ("title", "description", "default") if k in node}
        return {**outer, "anyOf": [node, {"type": "string", "pattern": ENV_REF}]}
    return node


def build() -> dict[str, Any]:
    schema = config.Config.model_json_schema(mode="validation")
    schema["properties"].pop("source", None)  # set by the loader, not written in the file
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    models = _models()
    for name, node in [("Config", schema), *defs.items()]:
        model = models.get(name)
        if model is None:
            continue
        for field, text in _comments(model).items():
            prop = node.get("properties", {}).get(field)
            if prop is not None and "description" not in prop:
                prop["description"] = text
    cache = defs["Route"]["properties"]["cache"]
    defs["Route"]["properties"]["cache"] = {
        "description": "the route's decision cache; `off` turns it off",
        "default": cache.pop("default", None),
        "anyOf": [cache, {"const": False}, {"const": "off"}],
    }
    schema = _allow_env_refs(schema)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "vvault-pep configuration (pep.yaml)",
        "description": "Generated from vvault_pep.config by `make schema`; see docs/configuration.md.",
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
    }


def render() -> bytes:
    return orjson.dumps(build(), option=orjson.OPT_INDENT_2) + b"\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vvault_pep.config.jsonschema", description=__doc__.splitlines()[0])
    parser.add_argument("--output", "-o", type=Path, help="write here instead of standard output")
    args = parser.parse_args(argv)
    text = render()
    if args.output is None:
        sys.stdout.buffer.write(text)
        return 0
    args.output.write_bytes(text)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
