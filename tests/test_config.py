"""config: bad files are refused with file, line and field; good ones load frozen."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml
from tests.support import ROOT, config_doc, free_port

from vvault_pep.config import load_config, parse_config
from vvault_pep.errors import ConfigError

GOOD = """\
listener:
  port: 8443
  host: 127.0.0.1
  tls:
    cert_file: {pki}/server.pem
    key_file: {pki}/server-key.pem
    client_ca_file: {pki}/ca.pem
upstreams:
  vvault:
    url: http://127.0.0.1:8080
routes:
  - name: secrets
    path: /v1/tenants/{{tenant}}/secrets/{{path*}}
    upstream: vvault
    policy: vvault/authz/decision
    authn: {{require: none}}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pep.yaml"
    path.write_text(text)
    return path


def test_good_config_loads_frozen(tmp_path: Path, pki: Path) -> None:
    config = load_config(_write(tmp_path, GOOD.format(pki=pki)))
    assert config.routes[0].methods == ("GET", "HEAD")
    assert config.opa.timeout_ms == 250
    with pytest.raises(pydantic.ValidationError):
        config.opa.timeout_ms = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("  port: 8443", "  port: 8443\n  prot: 1"), ":3: listener.prot: unknown key"),
        (lambda t: t.replace("port: 8443", "port: eighty"), ":2: listener.port: Input should be a valid integer"),
        (lambda t: t.replace("    upstream: vvault", "    upstream: nope"), ":14: routes[0].upstream: upstream 'nope'"),
        (lambda t: t.replace("/secrets/{path*}", "/{path*}/secrets"), ":13: routes[0].path: greedy parameter"),
        (lambda t: t.replace("vvault/authz/decision", "data.vvault.authz"), ":15: routes[0].policy: decision path"),
        (
            lambda t: t.replace("    url: http://127.0.0.1:8080", "    url: ftp://x"),
            ":10: upstreams.vvault.url: upstream url",
        ),
        (lambda t: t.replace("    upstream: vvault\n", ""), ":12: routes[0].upstream: required field is missing"),
        (lambda t: t.replace("server.pem", "missing.pem"), ":5: listener.tls.cert_file: file not found"),
        (lambda t: t + "opa:\n  managed: true\n", ":17: opa: managed: true needs policy_dir"),
        (
            lambda t: t + "redis:\n  url: redis://127.0.0.1:7000\n  mode: cluster\n  nodes: [10.0.0.5]\n",
            ":17: redis: nodes: '10.0.0.5' is not host:port",
        ),
        (
            lambda t: t + "opa:\n  url: ${NOPE_NOT_SET}\n",
            ":18: opa.url: environment variable ${NOPE_NOT_SET} is not set",
        ),
        (lambda t: t.replace("routes:", "listener: {}\nroutes:"), ":11: listener: key appears twice"),
        (
            lambda t: t + "  - name: secrets\n    path: /x\n    upstream: vvault\n    policy: a/b\n",
            ":17: routes[1].name: route name 'secrets' is used twice",
        ),
        (lambda t: t.replace("listener:", "listener: [").replace("upstreams:", "]\nupstreams:"), "not valid YAML"),
        (
            lambda t: t.replace("  port: 8443", "  port: 8443\n  memo_volatile_headers: [x-seq, Authorization]"),
            ":3: listener.memo_volatile_headers: 'Authorization' is read by the walk",
        ),
        (
            lambda t: t.replace("  port: 8443", "  port: 8443\n  memo_volatile_headers:\n    - x-seq\n    - accept"),
            ":5: listener.memo_volatile_headers[1]: 'accept' is in sanitize.policy_headers",
        ),
        (
            lambda t: t.replace("  port: 8443", "  port: 8443\n  memo_volatile_headers: [x-device-posture]"),
            ":3: listener.memo_volatile_headers[0]: 'x-device-posture' is the posture header",
        ),
    ],
)
def test_bad_configs_name_file_line_and_field(tmp_path: Path, pki: Path, edit, expected: str) -> None:  # type: ignore[no-untyped-def]
    path = _write(tmp_path, edit(GOOD.format(pki=pki)))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: config file not found"):
        load_config("/nowhere.yaml")


def test_env_interpolation_with_default(tmp_path: Path, pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEP_TEST_PORT", "9443")
    text = (
        GOOD.format(pki=pki)
        .replace("port: 8443", "port: ${PEP_TEST_PORT}")
        .replace("http://127.0.0.1:8080", "http://127.0.0.1:${PEP_TEST_UP:-8081}")
    )
    config = load_config(_write(tmp_path, text))
    assert config.listener.port == 9443
    assert config.upstreams["vvault"].url == "http://127.0.0.1:8081"


def test_secret_files_are_interpolated(tmp_path: Path, pki: Path) -> None:
    secret = tmp_path / "admin-token"
    secret.write_text("s3cret-token-0123456789abcdef-0123456789\n")
    text = GOOD.format(pki=pki) + f"admin:\n  token: ${{file:{secret}}}\n"
    assert load_config(_write(tmp_path, text)).admin.token == "s3cret-token-0123456789abcdef-0123456789"
    missing = GOOD.format(pki=pki) + "admin:\n  token: ${file:/nonexistent/token}\n"
    with pytest.raises(ConfigError, match=r":18: admin\.token: cannot read /nonexistent/token"):
        load_config(_write(tmp_path, missing))
    assert "s3cret" not in repr(load_config(_write(tmp_path, text)))  # secrets stay out of reprs


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path, pki: Path) -> None:
    text = GOOD.format(pki=os.path.relpath(pki, tmp_path))
    config = load_config(_write(tmp_path, text))
    assert config.listener.tls.cert_file == tmp_path / os.path.relpath(pki, tmp_path) / "server.pem"


def test_example_configs_are_valid(pki: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEP_PKI", str(pki))
    for path in sorted((ROOT / "examples" / "config").glob("*.yaml")):
        parse_config(path.read_text(), filename=str(path), base_dir=path.parent)


def test_serve_with_bad_config_exits_non_zero_without_listening(tmp_path: Path, pki: Path) -> None:
    port = free_port()
    text = (
        GOOD.format(pki=pki)
        .replace("port: 8443", f"port: {port}")
        .replace("    upstream: vvault", "    upstream: nope")
    )
    path = _write(tmp_path, text)
    proc = subprocess.run(
        [sys.executable, "-m", "vvault_pep.cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert f"{path}:14: routes[0].upstream: upstream 'nope' is not defined" in proc.stderr
    assert "Traceback" not in proc.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_check_reports_each_dependency(tmp_path: Path, pki: Path, opa, upstream, redis_server, down_port) -> None:  # type: ignore[no-untyped-def]
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, redis={"url": redis_server.url})
    doc["upstreams"] = {"vvault": doc["upstreams"]["vvault"]}
    doc["routes"] = [r for r in doc["routes"] if r["upstream"] == "vvault" and "nonexistent" not in r["policy"]]
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(doc))
    ok = subprocess.run(
        [sys.executable, "-m", "vvault_pep.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ok    opa:" in ok.stdout
    assert "ok    policy: data.vvault.authz.decision is defined" in ok.stdout
    assert "ok    upstream: vvault" in ok.stdout
    assert "ok    redis: standalone answers PING" in ok.stdout
    served = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, check=True).stdout
    version = next(w.split("=")[1] for w in served.split() if w.startswith("v="))
    assert f"ok    redis: version {'.'.join(version.split('.')[:2])}" in ok.stdout

    doc["opa"]["url"] = f"http://127.0.0.1:{down_port}"
    doc["routes"].append(
        {
            "name": "ghost",
            "path": "/ghost",
            "upstream": "vvault",
            "policy": "no/such/rule",
            "authn": {"require": "none"},
        }
    )
    path.write_text(yaml.safe_dump(doc))
    bad = subprocess.run(
        [sys.executable, "-m", "vvault_pep.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "FAIL  opa:" in bad.stdout
    doc["redis"] = {"url": f"redis://127.0.0.1:{down_port}/0"}
    path.write_text(yaml.safe_dump(doc))
    no_redis = subprocess.run(
        [sys.executable, "-m", "vvault_pep.cli", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "FAIL  redis: standalone is not reachable" in no_redis.stdout


@pytest.mark.parametrize(
    ("info", "oldest"),
    [
        ({"redis_version": "7.0.15", "os": "Linux"}, (7, 0)),
        ({"10.0.0.1:7000": {"redis_version": "7.2.4"}, "10.0.0.2:7000": {"redis_version": "6.0.9"}}, (6, 0)),
        ({"redis_version": "v7"}, None),
        ({"a": 1}, None),
        (None, None),
        (["7.0.0"], None),
    ],
    ids=["one server", "a cluster's nodes", "unreadable", "no version", "no answer", "another shape"],
)
def test_the_oldest_redis_version_is_what_check_judges(info: object, oldest: tuple[int, ...] | None) -> None:
    from vvault_pep.app.cli import _oldest_redis

    assert _oldest_redis(info) == oldest
