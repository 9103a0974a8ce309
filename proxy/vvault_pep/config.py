"""Configuration: one YAML file, validated once at load into frozen models.

Loading does, in order: read the file, compose the YAML (keeping each node's
line), interpolate ``${ENV_VAR}`` / ``${ENV_VAR:-default}`` in string scalars,
validate with pydantic (unknown keys are errors), resolve relative paths
against the config file's folder, and compile the route table.  Every failure
is a :class:`~vvault_pep.errors.ConfigError` whose message reads
``FILE:LINE: field.path: what is wrong``.

Security settings (trusted CAs, OPA address, upstreams) come only from here,
never from a request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError

_ENV_REF = re.compile(r"\$\{(?:file:([^}]+)|([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?)\}")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_METHOD = re.compile(r"^[A-Z]+$")
_DECISION_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(/[A-Za-z_][A-Za-z0-9_]*)*$")

# Headers the PEP owns: a client must never be able to name them, or it could
# speak for the PEP (its own forwarded-for, identity, client cert, posture).
DEFAULT_STRIP_HEADERS: tuple[str, ...] = (
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "x-request-id",
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-original-method",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-device-posture",
    "x-identity",
    "x-user",
    "x-remote-user",
    "true-client-ip",
    "client-ip",
    "x-cluster-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-original-host",
    "x-host",
    "remote-user",
    "ssl-client-cert",
    # trace context: continued only from trusted callers, and always re-set by the PEP
    "traceparent",
    "tracestate",
)
DEFAULT_STRIP_PREFIXES: tuple[str, ...] = (
    "x-forwarded",  # X-Forwarded, X-Forwarded-For, -Host, -Proto, -Server, -Prefix …
    "x-client-cert",
    "x-ssl-client",
    "x-vvault-",
    "x-pep-",
    "x-envoy-",
    "x-amzn-",
)
# Headers the policy sees in input.request.headers (lower-case).  Others are
# left out so the input stays small and free of secrets.
DEFAULT_POLICY_HEADERS: tuple[str, ...] = (
    "accept",
    "content-type",
    "content-length",
    "user-agent",
)


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value


def _existing_file(value: Path, info: ValidationInfo) -> Path:
    value = _resolve_path(value, info)
    if (info.context or {}).get("offline"):
        return value  # schema-only validation (e.g. a config destined for a container)
    if not value.is_file():
        raise ValueError(f"file not found: {value}")
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
ExistingFile = Annotated[Path, AfterValidator(_existing_file)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenerTls(_Model):
    cert_file: ExistingFile
    key_file: ExistingFile
    client_ca_file: ExistingFile
    client_auth: Literal["required", "optional"] = "required"
    min_version: Literal["1.2", "1.3"] = "1.2"
    require_client_auth_eku: bool = True
    # Certificate files are re-read when they change (cert-manager, SPIRE rotation).
    reload_interval_s: float = Field(30.0, gt=0)


class Listener(_Model):
    host: str = "0.0.0.0"
    port: int = Field(8443, ge=0, le=65535)
    tls: ListenerTls
    keepalive_timeout_s: float = Field(75.0, gt=0)
    # On SIGTERM: report not ready at once, keep serving this long, then stop
    # (lets a load balancer or Kubernetes take the replica out first).
    drain_s: float = Field(5.0, ge=0, le=300)
    # Host names this listener answers for; empty = any.  Others get 421, so a
    # client cannot make the upstream see a Host (X-Forwarded-Host) of its choosing.
    hosts: tuple[str, ...] = ()

    @field_validator("hosts")
    @classmethod
    def _lower(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.lower() for h in v)


class Admin(_Model):
    host: str = "127.0.0.1"
    port: int = Field(9901, ge=0, le=65535)
    # The admin API (/admin/...): either mTLS + an OPA decision (`tls` and `policy`,
    # recommended), or a bearer secret (`token`).  With neither it is switched off.
    tls: ListenerTls | None = None
    policy: str | None = None
    token: str | None = Field(None, repr=False, min_length=32)

    @model_validator(mode="after")
    def _policy_needs_tls(self) -> Admin:
        if self.policy is not None and self.tls is None:
            raise ValueError("admin.policy needs admin.tls: admins are identified by their client certificate")
        if self.policy is not None and not _DECISION_PATH.fullmatch(self.policy.strip("/")):
            raise ValueError("admin.policy is a decision path such as vvault/admin/decision")
        return self


class Opa(_Model):
    url: str = "http://127.0.0.1:8181"
    timeout_ms: int = Field(250, gt=0, le=60_000)
    max_connections: int = Field(64, gt=0)
    managed: bool = False
    binary: str = "opa"
    policy_dir: ConfigPath | None = None
    ready_timeout_s: float = Field(20.0, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("unix:// URL needs a socket path, e.g. unix:///run/opa.sock")
        elif parts.scheme in ("http", "https"):
            if not parts.hostname:
                raise ValueError("OPA URL needs a host")
        else:
            raise ValueError("scheme must be http, https or unix")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _managed_needs_policies(self) -> Opa:
        if self.managed and self.policy_dir is None:
            raise ValueError("managed: true needs policy_dir (the folder OPA loads)")
        if self.managed and self.policy_dir is not None and not self.policy_dir.is_dir():
            raise ValueError(f"policy_dir is not a folder: {self.policy_dir}")
        if self.managed and urlsplit(self.url).hostname not in (None, "127.0.0.1", "localhost", "::1"):
            raise ValueError("a managed OPA listens on loopback or a Unix socket only")
        return self


class UpstreamTls(_Model):
    ca_file: ExistingFile | None = None
    cert_file: ExistingFile | None = None
    key_file: ExistingFile | None = None
    server_hostname: str | None = None


class Upstream(_Model):
    url: str
    connect_timeout_s: float = Field(2.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    # Longest wait for a free pooled connection plus connecting: a full pool answers 504.
    pool_timeout_s: float = Field(5.0, gt=0)
    max_connections: int = Field(100, gt=0)
    tls: UpstreamTls | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("upstream url must be http:// or https:// with a host")
        if parts.query or parts.fragment:
            raise ValueError("upstream url must not carry a query or fragment")
        return v.rstrip("/")


class JwksTiming(_Model):
    default_ttl_s: float = Field(300, gt=0)
    min_ttl_s: float = Field(60, gt=0)
    max_ttl_s: float = Field(86_400, gt=0)
    unknown_kid_cooldown_s: float = Field(30, ge=0)
    max_staleness_s: float = Field(3600, ge=0)
    fetch_timeout_s: float = Field(2.0, gt=0)
    max_document_bytes: int = Field(1 << 20, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> JwksTiming:
        if self.min_ttl_s > self.max_ttl_s:
            raise ValueError("min_ttl_s must not exceed max_ttl_s")
        return self


SIGNING_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")


class ClaimMapping(_Model):
    subject: str = "sub"
    tenant: str = "tenant"
    roles: str = "roles"
    groups: str = "groups"
    scopes: str = "scope"
    client_id: str = "client_id"


class Issuer(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256", "EdDSA")
    discovery: bool = True
    jwks_uri: str | None = None
    jwks_file: ExistingFile | None = None
    shared_secret: str | None = Field(None, repr=False)
    allow_http: bool = False
    required_claims: tuple[str, ...] = ()
    leeway_s: float = Field(30, ge=0, le=300)
    typ: str | None = None
    claims: ClaimMapping = ClaimMapping()
    passthrough_claims: tuple[str, ...] = ()
    jwks: JwksTiming = JwksTiming()

    @field_validator("algorithms")
    @classmethod
    def _algs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for alg in v:
            if alg.lower() == "none":
                raise ValueError("'none' is never accepted")
            if alg not in SIGNING_ALGORITHMS + HMAC_ALGORITHMS:
                raise ValueError(f"unsupported algorithm {alg!r}")
        if not v:
            raise ValueError("at least one algorithm")
        return v

    @model_validator(mode="after")
    def _key_source(self) -> Issuer:
        hmac = [a for a in self.algorithms if a in HMAC_ALGORITHMS]
        if self.shared_secret is not None:
            if self.jwks_uri or self.jwks_file:
                raise ValueError("an issuer with a shared_secret has no public keys (jwks_uri/jwks_file)")
            if not hmac or len(hmac) != len(self.algorithms):
                raise ValueError("an issuer with a shared_secret lists only HMAC algorithms (HS256/384/512)")
            if len(self.shared_secret.encode()) < 32:
                raise ValueError("shared_secret must be at least 32 bytes")
        elif hmac:
            # HMAC with a public key as the secret is the classic algorithm-confusion attack.
            raise ValueError("HMAC algorithms are only for an issuer configured with a shared_secret")
        parts = urlsplit(self.issuer)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError("issuer must be an https:// URL")
        for url in (self.issuer, self.jwks_uri):
            if url and urlsplit(url).scheme == "http" and not self.allow_http:
                raise ValueError("http:// issuer or JWKS URL needs allow_http: true (tests and loopback only)")
        return self

    @property
    def uses_jwks(self) -> bool:
        return self.shared_secret is None


class Workload(_Model):
    trust_domains: tuple[str, ...] = ()

    @field_validator("trust_domains")
    @classmethod
    def _domains(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for td in v:
            if not re.fullmatch(r"[a-z0-9._-]+", td):
                raise ValueError(f"{td!r} is not a SPIFFE trust domain (lower-case letters, digits, '.', '_', '-')")
        return v


class Identity(_Model):
    issuers: tuple[Issuer, ...] = ()
    workload: Workload = Workload()
    max_token_bytes: int = Field(8192, ge=512)
    verified_cache_entries: int = Field(10_000, ge=0)
    realm: str = "vvault-pep"

    @model_validator(mode="after")
    def _unique(self) -> Identity:
        seen: set[str] = set()
        for issuer in self.issuers:
            if issuer.issuer in seen:
                raise ValueError(f"issuer {issuer.issuer!r} is configured twice")
            seen.add(issuer.issuer)
        return self


class Redis(_Model):
    url: str = Field(..., repr=False)  # redis://, rediss:// (TLS) or unix://; may carry user:password
    mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    sentinels: tuple[str, ...] = ()  # host:port, for mode: sentinel
    nodes: tuple[str, ...] = ()  # host:port startup nodes for mode: cluster (the url's host is one too)
    service_name: str | None = None  # the Sentinel master name
    username: str | None = None
    password: str | None = Field(None, repr=False)
    ca_file: ExistingFile | None = None
    timeout_ms: int = Field(50, gt=0, le=10_000)
    max_connections: int = Field(64, gt=0)
    key_prefix: str = Field("vvault-pep:", pattern=r"^[A-Za-z0-9:_.-]*$")
    retry_after_failure_s: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _mode(self) -> Redis:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("url must be redis://, rediss:// or unix://")
        if self.mode == "sentinel" and (not self.sentinels or not self.service_name):
            raise ValueError("mode: sentinel needs sentinels and service_name")
        for field in ("sentinels", "nodes"):
            for value in getattr(self, field):
                host, _, port = value.rpartition(":")
                if not host or not port.isdigit() or not 0 < int(port) < 65536:
                    raise ValueError(f"{field}: {value!r} is not host:port")
        if self.nodes and self.mode != "cluster":
            raise ValueError("nodes is for mode: cluster")
        if self.sentinels and self.mode != "sentinel":
            raise ValueError("sentinels is for mode: sentinel")
        if self.mode == "cluster" and scheme == "unix":
            raise ValueError("mode: cluster needs a redis:// or rediss:// url")
        return self


class Cache(_Model):
    l1_max_entries: int = Field(10_000, ge=0)
    l1_max_bytes: int = Field(16 << 20, ge=0)
    default_ttl_s: float = Field(10, gt=0)
    deny_ttl_s: float = Field(2, ge=0)
    max_ttl_s: float = Field(300, gt=0)
    revision_check_s: float = Field(2.0, gt=0)
    debug_headers: bool = False


class RouteCache(_Model):
    enabled: bool = True
    ttl_s: float | None = Field(None, gt=0)
    deny_ttl_s: float | None = Field(None, ge=0)
    key: tuple[str, ...] | None = None  # dotted input paths; None = whole input minus per-request fields

    @field_validator("key")
    @classmethod
    def _paths(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for path in v or ():
            if not re.fullmatch(r"[a-z_]+(\.[A-Za-z0-9_-]+)*", path):
                raise ValueError(f"{path!r} is not a dotted input path such as identity.subject")
        return v


class AuditSink(_Model):
    type: Literal["stdout", "file", "otlp"]
    path: ConfigPath | None = None  # file
    max_bytes: int = Field(100 << 20, gt=0)  # file: rotate past this size
    backups: int = Field(5, ge=0)  # file: rotated files kept
    protocol: Literal["grpc", "http"] = "grpc"  # otlp
    endpoint: str | None = None  # otlp, e.g. http://otel-collector:4317
    buffer_records: int = Field(10_000, gt=0)

    @model_validator(mode="after")
    def _needs(self) -> AuditSink:
        if self.type == "file" and self.path is None:
            raise ValueError("a file sink needs path")
        if self.type == "otlp" and not self.endpoint:
            raise ValueError("an otlp sink needs endpoint")
        return self


class Redact(_Model):
    # Dotted paths into the record's `input` (e.g. request.headers.x-api-key,
    # identity.claims.email).  Erased: removed.  Masked: replaced by a digest prefix.
    erase: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()
    # Query values often carry secrets (api_key=, X-Amz-Signature=): masked by default.
    query: Literal["mask", "erase", "keep"] = "mask"


class Audit(_Model):
    sinks: tuple[AuditSink, ...] = (AuditSink(type="stdout"),)
    include_input: bool = True
    redact: Redact = Redact()


class TraceSources(_Model):
    cidrs: tuple[str, ...] = ()
    spiffe_ids: tuple[str, ...] = ()

    @field_validator("cidrs")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        import ipaddress

        for cidr in v:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a CIDR") from exc
        return v


class Traces(_Model):
    exporter: Literal["none", "otlp-grpc", "otlp-http"] = "none"
    endpoint: str | None = None
    insecure: bool = False  # otlp-grpc without TLS (a collector on localhost)
    sample_ratio: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _endpoint(self) -> Traces:
        if self.exporter != "none" and not self.endpoint:
            raise ValueError("an OTLP exporter needs endpoint")
        return self


class Telemetry(_Model):
    service_name: str = "vvault-pep"
    traces: Traces = Traces()
    # Callers whose W3C traceparent/tracestate is continued; everyone else starts a new trace.
    trusted_trace_sources: TraceSources = TraceSources()


class Posture(_Model):
    # Device posture arrives as a signed, short-lived JWT from a device trust service.
    header: str = "x-device-posture"
    issuers: tuple[Issuer, ...] = ()
    max_age_s: float = Field(300, gt=0)
    # bound to the caller by its subject (sub = token subject), its certificate
    # (cnf.x5t#S256 = client certificate thumbprint), or either
    binding: Literal["subject", "cnf", "either"] = "either"

    @field_validator("header")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()


class Risk(_Model):
    enabled: bool = True
    window_s: int = Field(60, ge=10, le=3600)
    spike_factor: float = Field(3.0, gt=1)
    spike_min_requests: int = Field(20, ge=1)
    denial_window_s: int = Field(300, ge=10)
    tenant_timezones: dict[str, str] = {}
    business_hours: tuple[int, int] = (7, 19)
    timeout_ms: int = Field(30, gt=0)


class RateLimit(_Model):
    per: Literal["subject", "tenant", "client", "route"] = "subject"
    rate_per_s: float = Field(..., gt=0)
    burst: int = Field(1, ge=1)


class RouteAuthn(_Model):
    require: Literal["none", "user", "workload", "user+workload", "any"] = "none"
    bound_token: bool = False


class Route(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    host: str | None = None
    path: str
    methods: tuple[str, ...] = ("GET", "HEAD")
    upstream: str
    policy: str
    mode: Literal["enforce", "monitor"] = "enforce"
    authn: RouteAuthn = RouteAuthn()
    cache: RouteCache = RouteCache()
    rate_limit: RateLimit | None = None

    @field_validator("cache", mode="before")
    @classmethod
    def _cache_off(cls, v: Any) -> Any:
        # YAML reads a bare `off` as False: `cache: off` turns the route's cache off.
        return {"enabled": False} if v is False or v == "off" else v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for m in v:
            if not _METHOD.fullmatch(m):
                raise ValueError(f"method {m!r} must be an upper-case token such as GET")
        if not v:
            raise ValueError("at least one method")
        return v

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        v = v.strip("/")
        if not _DECISION_PATH.fullmatch(v):
            raise ValueError("decision path looks like 'vvault/authz/decision' (no 'data.' prefix, no dots)")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        return v.lower() if v is not None else None


class Sanitize(_Model):
    strip_headers: tuple[str, ...] = DEFAULT_STRIP_HEADERS
    strip_header_prefixes: tuple[str, ...] = DEFAULT_STRIP_PREFIXES
    policy_headers: tuple[str, ...] = DEFAULT_POLICY_HEADERS
    reject_semicolon: bool = False
    reject_encoded_percent: bool = True
    allow_underscore_headers: bool = False

    @field_validator("strip_headers", "strip_header_prefixes", "policy_headers")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name")
        return tuple(n.lower() for n in v)


class Limits(_Model):
    max_request_line_bytes: int = Field(8190, ge=256)
    max_header_bytes: int = Field(8190, ge=256)
    max_headers: int = Field(100, ge=8)
    max_body_bytes: int = Field(1 << 30, ge=0)
    max_total_header_bytes: int = Field(65_536, ge=1024)
    # Longest wait for the next piece of a request body (slow-body attacks hold
    # an upstream connection otherwise).
    body_idle_timeout_s: float = Field(30.0, gt=0)
    # Largest JSON response the PEP will redact fields from; larger ones are withheld (502).
    max_redact_bytes: int = Field(1 << 20, ge=1024)


class Config(_Model):
    listener: Listener
    admin: Admin = Admin()
    opa: Opa = Opa()
    upstreams: dict[str, Upstream]
    routes: tuple[Route, ...]
    sanitize: Sanitize = Sanitize()
    limits: Limits = Limits()
    identity: Identity = Identity()
    redis: Redis | None = None
    cache: Cache = Cache()
    audit: Audit = Audit()
    telemetry: Telemetry = Telemetry()
    posture: Posture = Posture()
    risk: Risk = Risk()
    source: str = Field("<memory>", exclude=True)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> Config:
        if (info.context or {}).get("defer_cross_checks"):
            return self  # parse_config reports them with their lines
        for _loc, message in self.problems():
            raise ValueError(message)
        return self

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Checks that span sections, each with the field path it is about."""
        out: list[tuple[tuple[str | int, ...], str]] = []
        if not self.routes:
            out.append((("routes",), "at least one route (there is no default upstream)"))
        names: set[str] = set()
        for i, route in enumerate(self.routes):
            if route.name in names:
                out.append((("routes", i, "name"), f"route name {route.name!r} is used twice"))
            names.add(route.name)
            needs_issuer = route.authn.require in ("user", "user+workload") or (
                route.authn.require == "any" and not self.identity.workload.trust_domains
            )
            if needs_issuer and not self.identity.issuers:
                out.append((("routes", i, "authn", "require"), "needs at least one issuer in identity.issuers"))
            if route.authn.require in ("workload", "user+workload") and not self.identity.workload.trust_domains:
                out.append((("routes", i, "authn", "require"), "needs identity.workload.trust_domains"))
            if route.upstream not in self.upstreams:
                out.append((("routes", i, "upstream"), f"upstream {route.upstream!r} is not defined in upstreams"))
        return out


# ---------------------------------------------------------------- loading


class _Located:
    """YAML → Python while remembering the line of every field path."""

    def __init__(self, filename: str, *, offline: bool = False) -> None:
        self.filename = filename
        self.offline = offline
        self.lines: dict[tuple[str | int, ...], int] = {}

    def build(self, node: yaml.Node, path: tuple[str | int, ...] = ()) -> Any:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = key_node.value
                if key in out:
                    raise ConfigError(
                        f"{self.filename}:{key_node.start_mark.line + 1}: {_dotted((*path, key))}: key appears twice"
                    )
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, (*path, key))
                self.lines[(*path, key)] = key_node.start_mark.line + 1
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        value = yaml.SafeLoader(" ").construct_object(node)
        if isinstance(value, str):
            value = self._interpolate(value, path)
        return value

    def _interpolate(self, text: str, path: tuple[str | int, ...]) -> str:
        def sub(match: re.Match[str]) -> str:
            secret_file, name, default = match.group(1), match.group(2), match.group(3)
            if secret_file is not None:
                # ${file:/path}: a secret mounted as a file (Kubernetes Secret volume)
                if self.offline:
                    return "offline-placeholder-" + "x" * 32
                try:
                    return Path(secret_file).read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ConfigError(self.where(path, f"cannot read {secret_file}: {exc.strerror}")) from None
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            raise ConfigError(self.where(path, f"environment variable ${{{name}}} is not set"))

        return _ENV_REF.sub(sub, text)

    def line_of(self, loc: tuple[str | int, ...]) -> int | None:
        for cut in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:cut]))
            if line is not None:
                return line
        return None

    def where(self, loc: tuple[str | int, ...], message: str) -> str:
        line = self.line_of(loc)
        place = f"{self.filename}:{line}" if line else self.filename
        field = _dotted(loc) or "(top level)"
        return f"{place}: {field}: {message}"


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def load_config(path: str | os.PathLike[str], *, offline: bool = False) -> Config:
    """Load and validate ``path``; raise ConfigError naming file, line and field."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{file}: config file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc}") from exc
    return parse_config(text, filename=str(file), base_dir=file.resolve().parent, offline=offline)


def parse_config(
    text: str, *, filename: str = "<string>", base_dir: Path | None = None, offline: bool = False
) -> Config:
    located = _Located(filename, offline=offline)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{filename}{line}: not valid YAML: {problem}") from exc
    if node is None:
        raise ConfigError(f"{filename}: config file is empty")
    data = located.build(node)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{filename}:1: the config must be a mapping of sections")
    data = {**data, "source": filename}
    try:
        config = Config.model_validate(
            data, context={"base_dir": base_dir, "defer_cross_checks": True, "offline": offline}
        )
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            problems.append(located.where(loc, _message(err)))
        raise ConfigError("\n".join(problems)) from None
    problems = [located.where(loc, message) for loc, message in config.problems()]
    if problems:
        raise ConfigError("\n".join(problems))
    # Compile the route table now so a bad template fails at load, with its line.
    from .routing import RouteTable, TemplateError

    for i, route in enumerate(config.routes):
        try:
            RouteTable.compile_one(route)
        except TemplateError as exc:
            raise ConfigError(located.where(("routes", i, "path"), str(exc))) from None
    return config


def _message(err: Mapping[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key (check its spelling and section)"
    if kind == "missing":
        return "required field is missing"
    msg = str(err.get("msg", "invalid value"))
    return msg.removeprefix("Value error, ")
