"""Certificates and a signed policy bundle for the compose demo.

    python -m deploy.compose_kit certs    # deploy/compose/certs: demo CA, server, clients
    python -m deploy.compose_kit bundle   # deploy/compose/bundles/vvault.tar.gz, signed (ES256),
                                          # and deploy/compose/.env with the verification key

The signing key stays in deploy/compose/bundles/.signing-key.pem (git-ignored); OPA gets
only the public key and refuses a bundle whose signature does not verify.

The bundle carries the input paths each decision path reads (``opa deps``), as
``data.vvault_pep.input_paths`` with the bundle's revision: the PEP keys its decision cache on
exactly those paths while that revision runs (docs/caching.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose"
# The decision paths the shipped routes ask (their input paths ship with the bundle).
DECISIONS = ("vvault/authz/decision",)


def opa_binary() -> str:
    for candidate in (os.environ.get("OPA_BIN"), str(ROOT / ".tools/bin/opa"), shutil.which("opa")):
        if candidate and Path(candidate).is_file():
            return candidate
    sys.exit("OPA not found: run `make tools`")


def certs() -> None:
    from examples.pki import make_pki

    out = make_pki(COMPOSE / "certs")
    for key in out.glob("*-key.pem"):
        key.chmod(0o640)  # readable by the container's group, never by others
    print(f"certificates in {out}")


def bundle(
    out_dir: Path = COMPOSE / "bundles",
    env_file: Path | None = COMPOSE / ".env",
    revision: str | None = None,
    source: Path = ROOT / "policies",
    decisions: tuple[str, ...] = DECISIONS,
) -> Path:
    """Build ``out_dir/vvault.tar.gz`` from ``source``, signed with ``out_dir/.signing-key.pem``."""
    sys.path.insert(0, str(ROOT / "proxy"))
    from vvault_pep.decide import deps

    revision = revision or _revision()
    out_dir.mkdir(parents=True, exist_ok=True)
    key_path = out_dir / ".signing-key.pem"
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
    private = serialization.load_pem_private_key(key_path.read_bytes(), None)
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    target = out_dir / "vvault.tar.gz"
    staging = Path(tempfile.mkdtemp(prefix="vvault-bundle-"))
    tree = staging / "bundle"
    shutil.copytree(source, tree, ignore=shutil.ignore_patterns("*_test.rego"))
    paths = deps.compute(opa_binary(), tree, decisions)
    shipped = tree / deps.DATA_PATH / "data.json"
    shipped.parent.mkdir(parents=True)
    shipped.write_text(json.dumps(deps.document(revision, paths), indent=2) + "\n")
    subprocess.run(
        [
            opa_binary(),
            "build",
            "--bundle",
            str(tree),
            "--output",
            str(target),
            "--signing-key",
            str(key_path),
            "--signing-alg",
            "ES256",
            "--revision",
            revision,
        ],
        check=True,
    )
    shutil.rmtree(staging, ignore_errors=True)
    (out_dir / "bundle-signer.pub.pem").write_bytes(public)
    if env_file is not None:
        pem = public.decode().strip().replace("\n", "\\n")
        env_file.write_text(f'BUNDLE_VERIFICATION_KEY="{pem}"\n')
    print(f"signed bundle {target} (verification key: {out_dir / 'bundle-signer.pub.pem'})")
    for decision, read in paths.items():
        print(f"  data.{decision.replace('/', '.')} reads {len(read)} input paths: {', '.join(read)}")
    return target


def _revision() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
            or "dev"
        )
    except (OSError, subprocess.CalledProcessError):
        return "dev"


if __name__ == "__main__":
    {"certs": certs, "bundle": bundle}[sys.argv[1] if len(sys.argv) > 1 else "certs"]()
