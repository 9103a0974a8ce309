"""No traceback from any config or CLI input: FILE:LINE: field: message, or one line saying what failed."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest
import yaml
from tests.conftest import Upstream
from tests.support import OpaProcess, config_doc

from vvault_pep.config import parse_config
from vvault_pep.errors import ConfigError

EXAMPLE = (Path(__file__).resolve().parent.parent / "examples" / "config" / "demo.yaml").read_text()


def line_of(text: str) -> int:
    """The line of the example config where ``text`` starts (so the cases follow edits to it)."""
    return EXAMPLE[: EXAMPLE.index(text)].count("\n") + 1


TIMEOUT = "timeout_ms: 250"
BOMB = "".join(f"x{i}: &x{i} [{', '.join([f'*x{i - 1}' if i else '1'] * 9)}]\n" for i in range(7))
LISTEN = "  host: 127.0.0.1\n  port: ${PEP_PORT"
OPA_AT, TIMEOUT_AT, HOST_AT = line_of("opa:\n"), line_of(TIMEOUT), line_of(LISTEN)
LISTENER_AT, URL_AT = line_of("listener:\n"), line_of(":${UPSTREAM_PORT:-8080}")
CASES = [
    # (text replaced, replacement, what the error says)
    ("opa:\n", "opa: !custom\n", rf":{OPA_AT}: opa: YAML tag !custom is not accepted"),
    (TIMEOUT, "timeout_ms: !!int 'abc'", rf":{TIMEOUT_AT}: opa.timeout_ms: not a valid int: 'abc'"),
    (TIMEOUT, "timeout_ms: !!binary aGk=", rf":{TIMEOUT_AT}: opa.timeout_ms: YAML tag !!binary"),
    (
        TIMEOUT,
        "timeout_ms: !!python/name:os.system ''",
        rf":{TIMEOUT_AT}: opa.timeout_ms: YAML tag !!python/name:os.system",
    ),
    (TIMEOUT, "timeout_ms: !!set {a}", rf":{TIMEOUT_AT}: opa.timeout_ms: YAML tag !!set"),
    ("routes:\n", "? [a, b]\n: 1\nroutes:\n", r":\d+: \(top level\): a key must be a plain string"),
    (
        TIMEOUT,
        "timeout_mss: 250",
        rf":{TIMEOUT_AT}: opa.timeout_mss: unknown key \(did you mean 'timeout_ms'\?\)",
    ),
    ("  vvault:\n    url", "  vvault:\n    urll", r"upstreams.vvault.urll: unknown key \(did you mean 'url'\?\)"),
    ("methods: [POST]", "methods: [POTS]", r"routes\[1\].methods: .*not an HTTP method \(did you mean POST\?\)"),
    (
        "policy_dir: ../../policies",
        "policy_dir: " + "a" * 5000,
        rf":{OPA_AT}: opa: policy_dir is not a folder",
    ),
    (
        LISTEN,
        LISTEN.replace("127.0.0.1", "'not a host!'"),
        rf":{HOST_AT}: listener.host: 'not a host!' is neither an IP",
    ),
    ("listener:\n", "listener: \x00\n", rf"^x\.yaml:{LISTENER_AT}: \(top level\): not valid YAML"),
    (
        ":${UPSTREAM_PORT:-8080}",
        ":99999",
        rf":{URL_AT}: upstreams.vvault.url: bad port in URL",
    ),
    (
        "http://127.0.0.1:${UPSTREAM_PORT",
        "http://exa mple:${UPSTREAM_PORT",
        rf":{URL_AT}: upstreams.vvault.url: 'exa mple' is",
    ),
    ("routes:\n", BOMB + "routes:\n", r"more than 100000 values once YAML aliases are expanded"),
]


@pytest.mark.parametrize(("old", "new", "expected"), CASES)
def test_config_errors_name_file_line_and_field(old: str, new: str, expected: str) -> None:
    import re

    assert old in EXAMPLE
    with pytest.raises(ConfigError) as info:
        parse_config(EXAMPLE.replace(old, new, 1), filename="x.yaml", offline=True)
    assert re.search(expected, str(info.value)), str(info.value)
    assert all(line.startswith("x.yaml:") for line in str(info.value).splitlines())


def test_a_long_or_unreadable_file_path_is_a_config_error(tmp_path: Path) -> None:
    secret = tmp_path / "key.pem"
    secret.write_text("x")
    secret.chmod(0)
    base = EXAMPLE.replace("${PEP_PKI:-../../.demo/pki}/server.pem", "/" + "b" * 5000)
    with pytest.raises(ConfigError, match=r"listener.tls.cert_file: cannot use this path: File name too long"):
        parse_config(base, filename="x.yaml")
    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(ConfigError, match="file not readable"):
            parse_config(EXAMPLE.replace("${PEP_PKI:-../../.demo/pki}/server-key.pem", str(secret)), filename="x.yaml")


async def _cli(*args: str) -> tuple[int, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vvault_pep.cli", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(40):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, err.decode().splitlines()


def _write(tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream, **listener: object) -> Path:
    doc = config_doc(pki, opa_url=opa.url, upstream_port=upstream.port, listener=dict(listener) or None)
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(
    ("flag", "content", "expected"),
    [
        ("--token", None, "--token {path}: cannot read: No such file or directory"),
        ("--cert", None, "--cert {path}: cannot read: No such file or directory"),
        ("--cert", b"not a certificate", "--cert {path}: not a PEM certificate"),
        ("--token", b"\xff\xfe", "--token {path}: not UTF-8 text"),
        ("--cert", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "cannot explain: "),
    ],
)
async def test_explain_file_arguments_get_one_line_naming_the_file(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream, flag: str, content: bytes | None, expected: str
) -> None:
    config = _write(tmp_path, pki, opa, upstream)
    arg = tmp_path / "arg.pem"
    if content is not None:
        arg.write_bytes(content)
    code, lines = await _cli("explain", "--config", str(config), "--path", "/v1/tenants/acme/secrets/x", flag, str(arg))
    assert code == 2
    assert len(lines) == 1 and expected.format(path=arg) in lines[0], lines


async def test_a_port_in_use_is_exit_1_with_one_line(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = _write(tmp_path, pki, opa, upstream, port=taken.getsockname()[1])
        code, lines = await _cli("serve", "--config", str(config))
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("vvault-pep: cannot start: ") and "in use" in lines[0], lines


async def test_an_unresolvable_listen_host_is_exit_1_with_one_line(
    tmp_path: Path, pki: Path, opa: OpaProcess, upstream: Upstream
) -> None:
    config = _write(tmp_path, pki, opa, upstream, host="no-such-host.invalid")
    code, lines = await _cli("serve", "--config", str(config))
    assert code == 1
    assert len(lines) == 1 and lines[0].startswith("vvault-pep: cannot start: "), lines


@pytest.mark.parametrize(
    ("field", "content", "expected"),
    [
        ("cert_file", b"not a certificate", "listener.tls.cert_file: the certificate and key_file do not load"),
        ("client_ca_file", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "listener.tls.client_ca"),
        ("crl_file", b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n", "listener.tls.crl_file: not a"),
    ],
)  # fmt: skip
def test_tls_files_that_do_not_load_are_config_errors(
    pki: Path, tmp_path: Path, field: str, content: bytes, expected: str
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(content)
    doc = config_doc(pki, opa_url="http://127.0.0.1:1", upstream_port=1, listener={"tls": {field: str(bad)}})
    with pytest.raises(ConfigError, match=r"^x\.yaml:\d+: " + expected):
        parse_config(yaml.safe_dump(doc, sort_keys=False), filename="x.yaml")
