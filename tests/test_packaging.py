"""Packaging: the OTLP exporters are extras, and a config that needs a missing one says which."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml
from tests.support import config_doc

from vvault_pep.config import load_config

# Runs the real CLI with one exporter made unimportable, as on a base install without that extra.
WITHOUT = """
import sys
blocked = sys.argv.pop(1)

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name == blocked or name.startswith(blocked + "."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
from vvault_pep.cli import main
sys.exit(main(sys.argv[1:]))
"""

GRPC = "opentelemetry.exporter.otlp.proto.grpc"
HTTP = "opentelemetry.exporter.otlp.proto.http"


def test_base_install_leaves_the_otlp_exporters_to_extras() -> None:
    reqs = requires("vvault-pep") or []
    base = [r for r in reqs if "extra ==" not in r]
    assert not [r for r in base if "otlp" in r], base
    assert any(r.startswith("opentelemetry-exporter-otlp-proto-grpc") and 'extra == "otlp-grpc"' in r for r in reqs)
    assert any(r.startswith("opentelemetry-exporter-otlp-proto-http") and 'extra == "otlp-http"' in r for r in reqs)


def _write(tmp_path: Path, pki: Path, **sections: object) -> Path:
    doc = config_doc(pki, opa_url="http://127.0.0.1:9", upstream_port=9, **sections)
    path = tmp_path / "pep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


@pytest.mark.parametrize(
    ("blocked", "sections", "field", "anchor", "extra"),
    [
        (
            GRPC,
            {"telemetry": {"traces": {"exporter": "otlp-grpc", "endpoint": "http://127.0.0.1:4317"}}},
            "telemetry.traces.exporter",
            "exporter:",
            "otlp-grpc",
        ),
        (
            HTTP,
            {"audit": {"sinks": [{"type": "otlp", "protocol": "http", "endpoint": "http://127.0.0.1:4318/v1/logs"}]}},
            "audit.sinks[0]",
            "- type: otlp",
            "otlp-http",
        ),
    ],
)
def test_a_config_needing_a_missing_exporter_names_the_extra(
    tmp_path: Path, pki: Path, blocked: str, sections: dict[str, object], field: str, anchor: str, extra: str
) -> None:
    path = _write(tmp_path, pki, **sections)
    load_config(path)  # installed here (.[dev] brings both extras): loads
    res = subprocess.run(
        [sys.executable, "-c", WITHOUT, blocked, "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    line = _line_of(path, anchor)
    protocol = extra.removeprefix("otlp-")
    assert (
        f"{path}:{line}: {field}: the OTLP {protocol} exporter is not installed: pip install 'vvault-pep[{extra}]'"
    ) in res.stderr


def test_the_other_extra_is_not_needed(tmp_path: Path, pki: Path) -> None:
    """A config using the HTTP exporter loads without the gRPC one (and its grpcio)."""
    path = _write(
        tmp_path, pki, telemetry={"traces": {"exporter": "otlp-http", "endpoint": "http://127.0.0.1:4318/v1/traces"}}
    )
    res = subprocess.run(
        [sys.executable, "-c", WITHOUT, GRPC, "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert f"ok    config: {path} is valid" in res.stdout, res.stdout + res.stderr
    assert "not installed" not in res.stderr


def test_offline_check_leaves_extras_to_the_target_machine(tmp_path: Path, pki: Path) -> None:
    """`check --offline` validates a config for a container image, which brings its own extras."""
    path = _write(
        tmp_path, pki, telemetry={"traces": {"exporter": "otlp-http", "endpoint": "http://127.0.0.1:4318/v1/traces"}}
    )
    res = subprocess.run(
        [sys.executable, "-c", WITHOUT, HTTP, "check", "--offline", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert res.returncode == 0, res.stderr


def test_redis_loads_without_opentelemetrys_metrics_sdk_and_leaves_it_importable() -> None:
    # redis-py would import the metrics SDK (about 1 MB per worker) for client metrics the PEP
    # never turns on; the PEP keeps it out while redis-py loads, and only then.
    probe = (
        "import sys, vvault_pep.cli, vvault_pep.shared.state as s\n"
        "assert 'opentelemetry.sdk.metrics' not in sys.modules, 'metrics SDK loaded'\n"
        "import redis.observability.providers as p\n"
        "assert p.OTEL_AVAILABLE is False\n"
        "import opentelemetry.sdk.metrics\n"
        "print('ok', s.RedisCluster.__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok RedisCluster"
