"""Validate everything in deploy/ with tools that run here (no container engine needed).

    python -m deploy.validate          # run by `make deploy-check`, part of `make test`

1. Kustomize renders base, dev and prod, and the Helm chart (deploy/helm/vvault-pep) passes
   `helm lint --strict` and renders with its ci/ values (dev and prod); every object is
   checked against the Kubernetes OpenAPI schemas of a pinned version (kubernetes-validate,
   strict: unknown fields fail).  cert-manager's Certificate has no schema there; it is the
   one kind allowed to be unknown.
2. checkov scans the rendered manifests and the Dockerfiles; every skipped check is listed
   in deploy/.checkov.yaml with its reason.  Zero failures.
3. hadolint lints the Dockerfiles.  Zero findings.
4. The compose files (compose.yaml and its Redis Sentinel / Cluster overrides) are validated
   against the Compose specification (compose-spec models, plus a strict check of top-level
   and service keys), and their images are pinned.
5. The PEP configs embedded in the manifests (the chart's rendered ones too) pass
   `vvault-pep check --offline`; the policies
   pass `opa check`; the signed bundle builds and verifies with its public key.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.31.0"
LINT = ROOT / ".tools" / "lint-venv" / "bin"
KUSTOMIZE = ROOT / ".tools" / "bin" / "kustomize"
HELM = ROOT / ".tools" / "bin" / "helm"
CHART = DEPLOY / "helm" / "vvault-pep"
ALLOWED_UNKNOWN_KINDS = {"Certificate"}  # cert-manager CRD


def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]


def checkov(framework: str, *args: str) -> subprocess.CompletedProcess[str]:
    """checkov, offline, with deploy/.checkov.yaml: zero failed checks is the bar."""
    return run(
        [
            str(LINT / "checkov"),
            "--quiet",
            "--compact",
            "--skip-download",
            "--config-file",
            str(DEPLOY / ".checkov.yaml"),
            "--framework",
            framework,
            *args,
        ]
    )


def step(name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'}  {name}" + (f"\n{detail}" if detail and not ok else ""))
    return ok


def opa() -> str:
    for candidate in (os.environ.get("OPA_BIN"), str(ROOT / ".tools/bin/opa"), shutil.which("opa")):
        if candidate and Path(candidate).is_file():
            return candidate
    sys.exit("OPA not found: run `make tools`")


def render(tmp: Path) -> dict[str, Path]:
    out = {}
    for name, path, extra in (
        ("base", DEPLOY / "k8s/base", []),
        ("dev", DEPLOY / "k8s/overlays/dev", ["--load-restrictor", "LoadRestrictionsNone"]),
        ("prod", DEPLOY / "k8s/overlays/prod", []),
    ):
        res = run([str(KUSTOMIZE), "build", *extra, str(path)])
        if res.returncode != 0:
            step(f"kustomize build {name}", False, res.stderr)
            sys.exit(1)
        target = tmp / f"{name}.yaml"
        target.write_text(res.stdout)
        out[name] = target
    return out


def render_helm(tmp: Path) -> dict[str, Path]:
    """`helm lint --strict` and `helm template` of the chart with each of its ci/ values files."""
    out = {}
    for values in sorted((CHART / "ci").glob("*-values.yaml")):
        name = "helm-" + values.name.removesuffix("-values.yaml")
        common = ["--values", str(values), "--kube-version", K8S_VERSION]
        res = run([str(HELM), "lint", "--strict", str(CHART), *common])
        if not step(f"helm lint --strict ({values.name})", res.returncode == 0, res.stdout + res.stderr):
            sys.exit(1)
        res = run([str(HELM), "template", "vvault", str(CHART), "--namespace", "vvault", *common])
        if res.returncode != 0:
            step(f"helm template ({values.name})", False, res.stderr)
            sys.exit(1)
        target = tmp / f"{name}.yaml"
        target.write_text(res.stdout)
        out[name] = target
    if not out:
        step("helm chart has ci/*-values.yaml to render", False)
        sys.exit(1)
    return out


def check_chart_pod(rendered: Path) -> bool:
    """The pod shape the chart promises, read from what it rendered."""
    docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
    problems: list[str] = []
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    sidecars = [c["name"] for c in pod.get("initContainers", []) if c.get("restartPolicy") == "Always"]
    if sidecars != ["opa", "pep"]:
        problems.append(f"native sidecars (initContainers, restartPolicy: Always) are {sidecars}, not [opa, pep]")
    (app,) = pod["containers"]
    config = yaml.safe_load(next(d for d in docs if "pep.yaml" in (d.get("data") or {}))["data"]["pep.yaml"])
    drain = float(config["listener"]["drain_s"])
    hold = float(app.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0))
    if hold <= drain:
        problems.append(f"the app's preStop ({hold}s) does not outlive the PEP's drain ({drain}s)")
    if pod["terminationGracePeriodSeconds"] <= hold + drain:
        problems.append("terminationGracePeriodSeconds does not cover the app's preStop plus the PEP's drain")
    if not any(str(e.get("value", "")).startswith("127.0.0.1:") for e in app.get("env", [])):
        problems.append("the app is not told to listen on loopback")
    policy = next((d for d in docs if d["kind"] == "NetworkPolicy"), None)
    if policy is None:
        problems.append("no NetworkPolicy")
    else:
        ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
        if ports != {8443, 9901} or any(not rule.get("ports") for rule in policy["spec"]["ingress"]):
            problems.append(f"the NetworkPolicy admits ports {sorted(ports)}, not only the PEP's 8443 and 9901")
    return step(
        f"{rendered.stem}: OPA and PEP as native sidecars, app outlives the drain, only the PEP admitted",
        not problems,
        "\n".join(problems),
    )


def embedded_pep_configs(rendered: Path, tmp: Path) -> list[Path]:
    """The pep.yaml of every ConfigMap in a rendered manifest, written out to check it."""
    found = []
    for doc in yaml.safe_load_all(rendered.read_text()):
        if doc and doc.get("kind") == "ConfigMap" and "pep.yaml" in (doc.get("data") or {}):
            target = tmp / f"{rendered.stem}-{doc['metadata']['name']}.pep.yaml"
            target.write_text(doc["data"]["pep.yaml"])
            found.append(target)
    return found


def main() -> int:
    good = True
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        rendered = render(tmp)
        good &= step("kustomize renders base, dev and prod", True)
        charts = render_helm(tmp)
        good &= step(f"helm renders the chart ({', '.join(charts)})", True)
        rendered.update(charts)
        for path in charts.values():
            good &= check_chart_pod(path)

        for name, path in rendered.items():
            res = run([str(LINT / "kubernetes-validate"), "-k", K8S_VERSION, "--strict", "--quiet", str(path)])
            problems = [
                line
                for line in (res.stdout + res.stderr).splitlines()
                if line.strip() and not any(f"kind {k} " in line for k in ALLOWED_UNKNOWN_KINDS)
            ]
            good &= step(
                f"kubernetes-validate {name} (Kubernetes {K8S_VERSION}, strict)",
                res.returncode in (0, 1) and not problems,
                "\n".join(problems),
            )

        for name, path in rendered.items():
            # base and dev name images by tag for readability; prod must pin digests.
            skips = [] if name.endswith("prod") else ["--skip-check", "CKV_K8S_43"]
            res = checkov("kubernetes", *skips, "-f", str(path))
            good &= step(
                f"checkov kubernetes {name}: 0 failed checks",
                res.returncode == 0,
                res.stdout[-4000:] + res.stderr[-2000:],
            )
        dockerfiles = sorted(str(p) for p in (DEPLOY / "docker").glob("Dockerfile*"))
        res = checkov("dockerfile", *[arg for f in dockerfiles for arg in ("-f", f)])
        good &= step(
            "checkov dockerfile: 0 failed checks", res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
        )
        res = run([str(LINT / "hadolint"), *dockerfiles])
        good &= step("hadolint: 0 findings", res.returncode == 0, res.stdout + res.stderr)

        for compose in sorted((DEPLOY / "compose").glob("compose*.yaml")):
            good &= check_compose(compose)

        helm_configs = [cfg for name in charts for cfg in embedded_pep_configs(rendered[name], tmp)]
        good &= step("the chart renders a pep.yaml for each values file", len(helm_configs) == len(charts))
        for cfg in (
            DEPLOY / "k8s/base/pep.yaml",
            *sorted((DEPLOY / "compose/config").glob("pep*.yaml")),
            *helm_configs,
        ):
            shown = cfg.relative_to(ROOT) if cfg.is_relative_to(ROOT) else f"{cfg.name} (rendered by helm)"
            res = run(
                [sys.executable, "-m", "vvault_pep.cli", "check", "--offline", "--config", str(cfg)],
                env={**os.environ, "PEP_ADMIN_TOKEN": "x" * 40, "REDIS_PASSWORD": "placeholder"},
            )
            good &= step(f"vvault-pep check --offline {shown}", res.returncode == 0, res.stdout + res.stderr)
        res = run([opa(), "check", "--strict", str(ROOT / "policies")])
        good &= step("opa check --strict policies/", res.returncode == 0, res.stdout + res.stderr)
        good &= check_signed_bundle(tmp)
    print("deploy: all checks passed" if good else "deploy: FAILED")
    return 0 if good else 1


def check_compose(path: Path) -> bool:
    """compose.yaml, or an override file on top of it (compose.<redis topology>.yaml)."""
    sys.path.insert(
        0, str(LINT.parent / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages")
    )
    from compose_spec import ComposeSpecification
    from compose_spec.models import Service

    doc = yaml.safe_load(path.read_text())
    override = path.name != "compose.yaml"
    problems: list[str] = []
    try:
        ComposeSpecification.model_validate(doc)
    except ValueError as exc:
        problems.append(str(exc))
    known_top = {f.alias or n for n, f in ComposeSpecification.model_fields.items()}
    known_service = {f.alias or n for n, f in Service.model_fields.items()}
    problems += [f"unknown top-level key {k!r}" for k in doc if k not in known_top and not k.startswith("x-")]
    for name, svc in (doc.get("services") or {}).items():
        problems += [
            f"service {name}: unknown key {k!r}" for k in svc if k not in known_service and not k.startswith("x-")
        ]
        image = svc.get("image", "")
        if override and not image and "build" not in svc:
            continue  # a service of compose.yaml, changed here: its image is pinned there
        if ":" not in image or image.endswith(":latest"):
            problems.append(f"service {name}: image {image!r} is not pinned to a version")
        if svc.get("privileged"):
            problems.append(f"service {name}: privileged")
    return step(
        f"{path.name} valid against the Compose specification, images pinned", not problems, "\n".join(problems)
    )


def check_signed_bundle(tmp: Path) -> bool:
    from deploy.compose_kit import bundle

    target = bundle(tmp / "bundles", env_file=None)
    pub = tmp / "bundles" / "bundle-signer.pub.pem"
    # `opa build` verifies a signed bundle it is given as input.
    res = run(
        [
            opa(),
            "build",
            "--bundle",
            str(target),
            "--verification-key",
            str(pub),
            "--verification-key-id",
            "vvault-bundle-signer",
            "--signing-alg",
            "ES256",
            "--output",
            str(tmp / "verified.tar.gz"),
        ]
    )
    ok = res.returncode == 0
    other = tmp / "other.pem"
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    forged = run(
        [
            opa(),
            "build",
            "--bundle",
            str(target),
            "--verification-key",
            str(other),
            "--verification-key-id",
            "vvault-bundle-signer",
            "--signing-alg",
            "ES256",
            "--output",
            str(tmp / "forged.tar.gz"),
        ]
    )
    return step(
        "signed policy bundle verifies with its key, and not with another",
        ok and forged.returncode != 0,
        res.stdout + res.stderr + forged.stdout + forged.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
