"""docs/pep.schema.json: current with the config models, named by the examples, and in
agreement with the loader about what a valid pep.yaml is."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from tests.support import ROOT

from vvault_pep.config import parse_config
from vvault_pep.config.jsonschema import render
from vvault_pep.errors import ConfigError

SCHEMA_FILE = ROOT / "docs" / "pep.schema.json"
REGENERATE = "make schema  (or: .venv/bin/python -m vvault_pep.config.jsonschema --output docs/pep.schema.json)"
EXAMPLES = [
    ROOT / "examples/config/demo.yaml",
    ROOT / "examples/config/identity.yaml",
    ROOT / "deploy/k8s/base/pep.yaml",
    ROOT / "deploy/compose/config/pep.yaml",
]
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)$", re.MULTILINE)


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_the_committed_schema_is_current() -> None:
    current = render().decode()
    assert SCHEMA_FILE.read_text() == current, (
        f"{SCHEMA_FILE.relative_to(ROOT)} is out of date with proxy/vvault_pep/config.py: run {REGENERATE}"
    )


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_name_the_schema_and_pass_it(path: Path) -> None:
    match = MODELINE.search(path.read_text())
    assert match, f"{path.relative_to(ROOT)} has no '# yaml-language-server: $schema=' line"
    assert (path.parent / match.group(1)).resolve() == SCHEMA_FILE
    doc = yaml.safe_load(path.read_text())
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in _validator().iter_errors(doc)]
    assert errors == []


def _doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "listener": {
            "host": "127.0.0.1",  # required: no PEP binds every interface by default
            "port": 8443,
            "tls": {"cert_file": "s.pem", "key_file": "k.pem", "client_ca_file": "ca.pem"},
        },
        "identity": {"workload": {"trust_domains": ["demo.vvault"]}},
        "upstreams": {"app": {"url": "http://127.0.0.1:8080"}},
        "routes": [
            {
                "name": "r",
                "path": "/v1/{x}",
                "upstream": "app",
                "policy": "vvault/authz/decision",
                "authn": {"require": "workload"},
            }
        ],
    }
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[int(last) if isinstance(node, list) else last] = value
    return doc


# (what the editor is shown, the document): the schema and the loader must agree on each.
CASES = [
    ("minimal config", _doc(), True),
    ("port from the environment", _doc(listener__port="${PEP_PORT:-8443}"), True),
    ("a boolean from the environment", _doc(opa__managed="${OPA_MANAGED:-false}"), True),
    ("cache: off on a route", _doc(routes__0__cache=False), True),
    ("cache: 'off' on a route", _doc(routes__0__cache="off"), True),
    ("a misspelt section", _doc(listner={"port": 1}), False),
    ("a misspelt field", _doc(listener__prot=1), False),
    ("a port out of range", _doc(listener__port=70000), False),
    ("a port that is not a number", _doc(listener__port="https"), False),
    ("an unknown client_auth", _doc(listener__tls__client_auth="sometimes"), False),
    ("an unknown exporter", _doc(telemetry={"traces": {"exporter": "zipkin", "endpoint": "http://c"}}), False),
    ("a route without its policy", _doc(routes=[{"name": "r", "path": "/v1/x", "upstream": "app"}]), False),
    ("no listener", {k: v for k, v in _doc().items() if k != "listener"}, False),
    ("no listener host", {**_doc(), "listener": {k: v for k, v in _doc()["listener"].items() if k != "host"}}, False),
]


@pytest.mark.parametrize(("what", "doc", "valid"), CASES, ids=[c[0] for c in CASES])
def test_schema_and_loader_agree(what: str, doc: dict[str, Any], valid: bool) -> None:
    schema_ok = _validator().is_valid(doc)
    text = yaml.safe_dump(doc).replace("${PEP_PORT:-8443}", "'${PEP_PORT:-8443}'")
    try:
        parse_config(text, offline=True)
        loader_ok = True
    except ConfigError:
        loader_ok = False
    assert (schema_ok, loader_ok) == (valid, valid), what


def test_fields_carry_their_comments_as_descriptions() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    drain = schema["$defs"]["Listener"]["properties"]["drain_s"]
    assert drain["description"].startswith("On SIGTERM: report not ready at once")
    assert schema["$defs"]["Listener"]["properties"]["port"]["default"] == 8443
