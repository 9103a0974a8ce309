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

import difflib
import importlib.util
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

_ENV_REF = re.compile(r"\$\{(?:file:([^}]+)|([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?)\}")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_METHOD = re.compile(r"^[A-Z]+$")
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
# RFC 9110 methods plus PATCH (RFC 5789); a route naming anything else is a typo.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE"})
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
# Upstream response headers dropped by default: they fingerprint the stack behind
# the PEP (product and version) or expose its debugging internals.
DEFAULT_RESPONSE_DROP: tuple[str, ...] = (
    "server",
    "x-powered-by",
    "x-aspnet-version",
    "x-aspnetmvc-version",
    "x-runtime",
    "x-version",
    "x-generator",
    "x-backend-server",
    "x-served-by",
    "x-upstream",
    "x-sourcefiles",
    "x-turbo-charged-by",
    "x-drupal-cache",
    "x-drupal-dynamic-cache",
    "x-varnish",
    "x-cache",
    "x-cache-hits",
    "x-amz-request-id",
    "x-amz-id-2",
    "via",
    "set-cookie2",
)
DEFAULT_RESPONSE_DROP_PREFIXES: tuple[str, ...] = (
    "x-debug",  # X-Debug, X-Debug-Token, X-Debug-Token-Link (Symfony profiler) …
    "x-envoy-",
    "x-amzn-",
    "x-internal-",
)
# Headers the policy sees in input.request.headers (lower-case).  Others are
# left out so the input stays small and free of secrets.
# Left out of the memo's key by default: values new on every request, read by no stage.
DEFAULT_MEMO_VOLATILE: tuple[str, ...] = (
    "traceparent",
    "tracestate",
    "x-request-id",
    "x-correlation-id",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-cloud-trace-context",
)
# Client headers never forwarded as they came (core.sanitize drops them): hop-by-hop ones
# (RFC 9110 7.6.1), and the framing and negotiation the PEP redoes itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
        "expect",
        "host",
    }
)
# Headers some stage reads before the memo's part ends (those above, the credential,
# Content-Type for body inspection, the client certificate a trusted proxy forwards):
# never left out of its key.  The posture header and the policy's headers are refused
# in Config.problems (they are configured).
MEMO_READ = HOP_BY_HOP | {"authorization", "content-type", "x-forwarded-client-cert"}
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
    try:
        found = value.is_file()
    except OSError as exc:  # a name too long, a loop of links
        raise ValueError(f"cannot use this path: {exc.strerror}") from None
    if not found:
        raise ValueError(f"file not found: {value}")
    if not os.access(value, os.R_OK):
        raise ValueError(f"file not readable: {value}")
    return value


# The OTLP exporters ship as extras (pip install "vvault-pep[otlp-grpc]"): the base
# install stays small, and a config naming an exporter that is not installed fails at
# load, saying which extra brings it, rather than at the first export.
OTLP_EXTRAS: dict[str, tuple[str, str]] = {
    "grpc": ("otlp-grpc", "opentelemetry.exporter.otlp.proto.grpc"),
    "http": ("otlp-http", "opentelemetry.exporter.otlp.proto.http"),
}


def otlp_missing(protocol: str) -> str | None:
    """The message for an OTLP exporter that is not installed, else None."""
    extra, module = OTLP_EXTRAS[protocol]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if found:
        return None
    return f"the OTLP {protocol} exporter is not installed: pip install 'vvault-pep[{extra}]'"


def _require_otlp(protocol: str, info: ValidationInfo) -> None:
    if (info.context or {}).get("offline"):
        return  # a config checked for another machine (a container image carries its extras)
    message = otlp_missing(protocol)
    if message is not None:
        raise ValueError(message)


# RFC 1123 labels, with "_" allowed too (container runtimes resolve such service names).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?$")


def _listen_host(value: str) -> str:
    """An IP address or an RFC 1123 host name to listen on (found out at load, not at bind)."""
    import ipaddress

    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value):
            raise ValueError(f"{value!r} is neither an IP address nor a host name") from None
    return value


ListenHost = Annotated[str, AfterValidator(_listen_host)]


def _check_authority(host: str, parts: Any) -> None:
    """A URL's host is an IP address or a host name, and its port a number in range."""
    _listen_host(host)
    try:
        parts.port  # noqa: B018 — urllib checks the port only when asked
    except ValueError as exc:
        raise ValueError(f"bad port in URL: {exc}") from None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


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
    # Certificate revocation lists (PEM), one file or several; re-read like the
    # certificates.  "chain" checks every certificate of the chain (each CA needs
    # its CRL), "leaf" only the client's own.  A CRL past its nextUpdate refuses
    # every handshake it covers and makes /readyz false.
    crl_file: tuple[ExistingFile, ...] = ()
    crl_check: Literal["chain", "leaf"] = "chain"

    @field_validator("crl_file", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("crl_file")
    @classmethod
    def _pem_crls(cls, v: tuple[Path, ...], info: ValidationInfo) -> tuple[Path, ...]:
        if (info.context or {}).get("offline"):
            return v
        for path in v:
            try:
                pem = path.read_bytes()
            except OSError as exc:
                raise ValueError(f"cannot read {path}: {exc.strerror}") from None
            if b"-----BEGIN X509 CRL-----" not in pem:
                raise ValueError(f"{path} holds no PEM CRL (-----BEGIN X509 CRL-----)")
        return v


class Listener(_Model):
    # No default: a PEP that binds every interface by accident is reachable from
    # networks nobody meant it to face.  Write 0.0.0.0 (or ::) when that is the intent.
    host: ListenHost
    port: int = Field(8443, ge=0, le=65535)
    tls: ListenerTls
    keepalive_timeout_s: float = Field(75.0, gt=0)
    # Remember, per keep-alive connection, what the stages up to the subject made of a
    # request seen before byte for byte (docs/performance.md); false walks every request whole.
    memo: bool = True
    # Headers whose values are new on every request (trace context, request ids) and that
    # no stage reads: left out of the memo's key, so a client that sends them still
    # repeats itself; each is checked and forwarded (or stripped) on every request.
    memo_volatile_headers: tuple[str, ...] = DEFAULT_MEMO_VOLATILE
    # On SIGTERM: report not ready at once, keep serving this long, then stop
    # (lets a load balancer or Kubernetes take the replica out first).
    drain_s: float = Field(5.0, ge=0, le=300)
    # Host names this listener answers for; empty = the names of its server
    # certificate (DNS and IP SANs), ["*"] = any.  Others get 421, so a client
    # cannot make the upstream see a Host (X-Forwarded-Host) of its choosing.
    hosts: tuple[str, ...] = ()

    @field_validator("hosts")
    @classmethod
    def _lower(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(h.lower() for h in v)

    @field_validator("memo_volatile_headers")
    @classmethod
    def _volatile(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a header name")
            if name.lower() in MEMO_READ:
                raise ValueError(f"{name!r} is read by the walk: it cannot be left out of the memo's key")
        return tuple(dict.fromkeys(n.lower() for n in v))


class Admin(_Model):
    host: ListenHost = "127.0.0.1"
    port: int = Field(9901, ge=0, le=65535)
    # The admin API (/admin/...): either mTLS + an OPA decision (`tls` and `policy`,
    # recommended), or a bearer secret (`token`).  With neither it is switched off.
    tls: ListenerTls | None = None
    policy: str | None = None
    token: str | None = Field(None, repr=False, min_length=32)
    # Whether the shared token may push OPA data and policy modules (opa.data.put,
    # opa.policy.put): a push can rewrite every rule, and the token carries no MFA and
    # names nobody.  Off: those pushes need admin.tls with admin.policy.
    token_may_push: bool = False

    @model_validator(mode="after")
    def _policy_needs_tls(self) -> Admin:
        if self.policy is not None and self.tls is None:
            raise ValueError("admin.policy needs admin.tls: admins are identified by their client certificate")
        if self.policy is not None and not _DECISION_PATH.fullmatch(self.policy.strip("/")):
            raise ValueError("admin.policy is a decision path such as vvault/admin/decision")
        return self


class Opa(_Model):
    url: str = "http://127.0.0.1:8181"
    # OPA run with --authentication=token: sent as a bearer token on every call.
    token: str | None = Field(None, repr=False, min_length=1)
    ca_file: ExistingFile | None = None  # https:// OPA: the CA of its server certificate
    timeout_ms: int = Field(250, gt=0, le=60_000)
    max_connections: int = Field(64, gt=0)
    managed: bool = False
    # Where a managed OPA listens: "unix" (default) — a socket in a private 0700
    # folder the PEP creates, which no other local process can take; "tcp" — `url`
    # (loopback), an explicit choice: a process that holds the port first could answer.
    managed_listen: Literal["unix", "tcp"] = "unix"
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
            _check_authority(parts.hostname, parts)
        else:
            raise ValueError("scheme must be http, https or unix")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _transport(self) -> Opa:
        parts = urlsplit(self.url)
        if self.ca_file is not None and parts.scheme != "https":
            raise ValueError("ca_file is for an https:// OPA")
        if self.token is not None and parts.scheme == "http" and parts.hostname not in _LOOPBACK:
            raise ValueError("an OPA token is sent over https, a Unix socket or loopback only")
        return self

    @model_validator(mode="after")
    def _managed_needs_policies(self) -> Opa:
        if self.managed and self.policy_dir is None:
            raise ValueError("managed: true needs policy_dir (the folder OPA loads)")
        if self.managed and self.policy_dir is not None and not _is_dir(self.policy_dir):
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
    # Send Envoy's x-forwarded-client-cert describing the identified client (docs/identity.md).
    xfcc: bool = False
    connect_timeout_s: float = Field(2.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    # Longest wait for a free pooled connection; then a fast 503 with Retry-After.
    pool_timeout_s: float = Field(1.0, gt=0)
    max_connections: int = Field(100, gt=0)
    tls: UpstreamTls | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("upstream url must be http:// or https:// with a host")
        _check_authority(parts.hostname, parts)
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
    # Besides exp, iss and aud: a token without a subject names nobody.
    required_claims: tuple[str, ...] = ("sub",)
    leeway_s: float = Field(30, ge=0, le=300)
    # Access tokens only (RFC 9068): an ID token or another JWT of this issuer is refused.
    typ: str | None = "at+jwt"
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
    # SPIFFE ID → the tenant that workload belongs to: a verified tenant for the
    # workload's own calls (containment, rate limits), never one a request names.
    tenants: dict[str, str] = {}

    @field_validator("tenants")
    @classmethod
    def _tenants(cls, v: dict[str, str]) -> dict[str, str]:
        for spiffe_id, tenant in v.items():
            if not spiffe_id.startswith("spiffe://"):
                raise ValueError(f"{spiffe_id!r} is not a SPIFFE ID (spiffe://trust-domain/path)")
            if not tenant:
                raise ValueError(f"the tenant of {spiffe_id!r} is empty")
        return v

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


class FrontProxy(_Model):
    """A front proxy identified by its own verified client certificate: one of the two."""

    spiffe_id: str | None = None
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")  # hex thumbprint of its certificate

    @model_validator(mode="after")
    def _one(self) -> FrontProxy:
        if (self.spiffe_id is None) == (self.sha256 is None):
            raise ValueError("name a front proxy by exactly one of spiffe_id or sha256")
        if self.spiffe_id is not None and not self.spiffe_id.startswith("spiffe://"):
            raise ValueError("spiffe_id is a spiffe:// URI")
        return self


class Xfcc(_Model):
    # Front proxies (Envoy, an ingress) whose x-forwarded-client-cert is believed; from
    # anyone else the header is stripped unread.
    trusted_proxies: tuple[FrontProxy, ...] = ()
    # The By= value the PEP emits: its own URI (e.g. its SPIFFE ID); omitted if unset.
    by: str | None = None
    # More than one XFCC element from a trusted proxy is refused (400): a front proxy that
    # appends (APPEND_FORWARD) passes on an element its client wrote.  Envoy: SANITIZE_SET.
    require_single_element: bool = True


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
    # Quarantines, lifts, epochs and the revision pushed over pub/sub into local state: an
    # L1 hit then asks Redis nothing while the channel is known healthy (docs/performance.md).
    push: bool = True
    heartbeat_ms: int = Field(250, ge=10, le=10_000)  # how often a replica beats on the channel
    heartbeat_deadline_ms: int = Field(250, ge=10, le=10_000)  # how late its own beat may come back

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
    # Without bundles the revision is a hash of OPA's modules, which means fetching every
    # module's source: done at most this often (0: only at start and after an OPA restart;
    # right when the PEP is OPA's only writer, e.g. a managed OPA).
    policy_check_s: float = Field(30.0, ge=0)
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
    type: Literal["stdout", "file", "otlp", "http"]
    path: ConfigPath | None = None  # file
    max_bytes: int = Field(100 << 20, gt=0)  # file: rotate past this size
    backups: int = Field(5, ge=0)  # file: rotated files kept
    protocol: Literal["grpc", "http"] = "grpc"  # otlp
    endpoint: str | None = None  # otlp, e.g. http://otel-collector:4317
    buffer_records: int = Field(10_000, gt=0)
    # http: POST batches to a decision-log service in OPA's wire format (gzip JSON array)
    url: str | None = None  # e.g. https://logs.example/logs
    ca_file: ExistingFile | None = None  # https: the CA that signs the service's certificate
    token: str | None = Field(None, repr=False)  # http: sent as a bearer token
    timeout_s: float = Field(5.0, gt=0, le=120)
    max_attempts: int = Field(5, ge=1, le=100)  # per batch, then the batch is counted as dropped
    backoff_s: float = Field(0.2, gt=0)  # first retry delay, doubled per attempt (with jitter)
    max_backoff_s: float = Field(10.0, gt=0)
    flush_interval_s: float = Field(1.0, gt=0, le=600)  # http: a quiet PEP's records leave within this
    batch_records: int = Field(256, ge=1, le=10_000)  # http: records per POST

    @model_validator(mode="after")
    def _needs(self, info: ValidationInfo) -> AuditSink:
        if self.type == "file" and self.path is None:
            raise ValueError("a file sink needs path")
        if self.type == "otlp" and not self.endpoint:
            raise ValueError("an otlp sink needs endpoint")
        if self.type == "otlp":
            _require_otlp(self.protocol, info)
        if self.type == "http":
            parts = urlsplit(self.url or "")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("an http sink needs url: http:// or https:// with a host")
            if parts.scheme == "http" and self.token is not None and parts.hostname not in _LOOPBACK:
                raise ValueError("an http sink sends its token over https only (or to loopback)")
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
    # pep: the PEP's own record (docs/observability.md).  opa: each record is an OPA
    # decision-log event, read unchanged by OPA's consumers (docs/decision-logs.md).
    format: Literal["pep", "opa"] = "pep"
    # opa: extra labels beside id and version (OPA's decision_logs labels)
    labels: dict[str, str] = {}
    # opa: PEP-only facts (status, cache, upstream, latency…) in a `vvault_pep` block;
    # false for a consumer that refuses fields OPA does not define.
    extension: bool = True
    # Largest record written; a larger one is cut down and marked "truncated", so no
    # request writes much more to the log than it sent.
    max_record_bytes: int = Field(16_384, ge=2048)


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

    @field_validator("exporter")
    @classmethod
    def _installed(cls, v: str, info: ValidationInfo) -> str:
        if v != "none":
            _require_otlp(v.removeprefix("otlp-"), info)
        return v

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


class PostureIssuer(Issuer):
    # A device trust service's assertions are not access tokens: no typ by default, and
    # one bound by certificate (cnf) need not name a subject.
    typ: str | None = None
    required_claims: tuple[str, ...] = ()


class Posture(_Model):
    # Device posture arrives as a signed, short-lived JWT from a device trust service.
    header: str = "x-device-posture"
    issuers: tuple[PostureIssuer, ...] = ()
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
    # Request counts and denials kept per replica and written to Redis in one batch this
    # often (0: one Redis script per request, as before); a new network or device is
    # still decided on the request.  The staleness this allows is in docs/continuous-verification.md.
    flush_ms: int = Field(100, ge=0, le=5_000)
    # A subject synced with Redis longer ago than this is read on its request (the bound on
    # what a local answer may miss of the other replicas; at least 2 x flush_ms is used).
    local_max_age_ms: int = Field(1_000, ge=10, le=60_000)


class RateLimit(_Model):
    per: Literal["subject", "tenant", "certificate", "workload", "client", "route"] = "subject"
    rate_per_s: float = Field(..., gt=0)
    burst: int = Field(1, ge=1)


class RouteAuthn(_Model):
    # "any" by default: a route open to anonymous callers is written down as such.
    require: Literal["none", "user", "workload", "user+workload", "any"] = "any"
    bound_token: bool = False


_SetCookie = Literal["pass", "drop", "host_only_secure"]


def _header_names(v: tuple[str, ...] | None) -> tuple[str, ...] | None:
    for name in v or ():
        if not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a header name")
    return tuple(n.lower() for n in v) if v is not None else None


class Responses(_Model):
    """What of the upstream's answer headers may reach clients (all routes)."""

    drop: tuple[str, ...] = DEFAULT_RESPONSE_DROP
    drop_prefixes: tuple[str, ...] = DEFAULT_RESPONSE_DROP_PREFIXES
    # pass | drop | host_only_secure: only cookies without Domain and with Secure
    set_cookie: _SetCookie = "host_only_secure"

    @field_validator("drop", "drop_prefixes")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _header_names(v) or ()


class RouteResponses(_Model):
    drop: tuple[str, ...] = ()  # dropped besides the global list
    allow: tuple[str, ...] | None = None  # allow-list mode: only these (and the framing headers) pass
    set_cookie: _SetCookie | None = None  # None: the global rule

    @field_validator("drop", "allow")
    @classmethod
    def _names(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return _header_names(v)


class RouteBody(_Model):
    """Let the policy read the request's JSON body (``input.request.body``), opt-in per route."""

    inspect: Literal["json"] = "json"
    # Inspection limit: a longer body is forwarded untouched, the policy sees
    # body null and body_truncated true (and should deny).
    max_bytes: int = Field(65_536, ge=1, le=1 << 20)
    # Whether the body is part of the decision cache key.  Without it the route's
    # decisions are not cached: a cached answer must never be served for another body.
    cache_key: bool = False


class Route(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    host: str | None = None
    path: str
    methods: tuple[str, ...] = ("GET", "HEAD")
    upstream: str
    policy: str
    # projected: OPA gets only the input paths the policy reads, when they are known
    # for the running revision; full: always the whole input.
    opa_input: Literal["projected", "full"] = "projected"
    mode: Literal["enforce", "monitor"] = "enforce"
    authn: RouteAuthn = RouteAuthn()
    cache: RouteCache = RouteCache()
    rate_limit: RateLimit | None = None
    responses: RouteResponses = RouteResponses()
    # Longest time to receive the whole request body; None: limits.body_deadline_s.
    body_deadline_s: float | None = Field(None, gt=0)
    # Raise limits.max_body_bytes for this route only (uploads, blobs).
    max_body_bytes: int | None = Field(None, ge=0)
    # The client's Authorization header reaches the upstream only when the route says so:
    # the PEP verified it, the app should trust the PEP's headers, not re-read the token.
    forward_authorization: bool = False
    body: RouteBody | None = None  # the policy reads the JSON body (docs/policy-input.md)

    @model_validator(mode="after")
    def _body_in_cache_key(self) -> Route:
        if self.body is None or not self.cache.enabled:
            return self
        if not self.body.cache_key and "cache" in self.model_fields_set:
            raise ValueError(
                "this route's policy reads the body: set body.cache_key: true to cache by body, or cache: off"
            )
        # Set once, while validating (the model is frozen from then on).
        if not self.body.cache_key:
            object.__setattr__(self, "cache", self.cache.model_copy(update={"enabled": False}))
        elif self.cache.key is not None:
            key = (*self.cache.key, "request.body", "request.body_truncated")
            object.__setattr__(self, "cache", self.cache.model_copy(update={"key": key}))
        return self

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
            if m not in KNOWN_METHODS:
                close = difflib.get_close_matches(m, sorted(KNOWN_METHODS), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"method {m!r} is not an HTTP method{hint}: {', '.join(sorted(KNOWN_METHODS))}")
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
    # `;` path parameters are refused: `pii;v=1/ssn` would be judged as one data class
    # and served by a Tomcat-like upstream as `pii/ssn`.
    reject_semicolon: bool = True
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
    # More query parameters than this → 400: each one lands in the policy input and
    # the audit record (no request may write much more to the log than it sent).
    max_query_params: int = Field(64, ge=1)
    # A few MiB: enough for secrets and vectors; routes that take blobs raise it.
    max_body_bytes: int = Field(8 << 20, ge=0)
    max_total_header_bytes: int = Field(65_536, ge=1024)
    # Longest wait for the next piece of a request body (slow-body attacks hold
    # an upstream connection otherwise).
    body_idle_timeout_s: float = Field(30.0, gt=0)
    # Longest time to receive a whole request body (routes may set their own).
    body_deadline_s: float = Field(60.0, gt=0)
    # Bodies up to this size are received whole before an upstream connection is
    # taken, so a client trickling a small body holds no pooled connection.
    buffer_body_bytes: int = Field(64 << 10, ge=0)
    # Longest a client may leave a streamed answer unread before it is cut off
    # (a stalled reader holds the pooled upstream connection).
    send_idle_timeout_s: float = Field(30.0, gt=0)
    # Requests in flight at once per client certificate and per subject (per process).
    max_in_flight_per_client: int = Field(32, ge=1)
    max_in_flight_per_subject: int = Field(32, ge=1)
    # Largest JSON response the PEP will redact fields from; larger ones are withheld (502).
    max_redact_bytes: int = Field(1 << 20, ge=1024)
    # How often freed C-heap memory is handed back to the kernel (glibc's malloc_trim),
    # so a burst does not leave each worker's RSS raised for good; 0: never.
    heap_trim_interval_s: float = Field(10.0, ge=0)


class Config(_Model):
    listener: Listener
    admin: Admin = Admin()
    opa: Opa = Opa()
    upstreams: dict[str, Upstream]
    routes: tuple[Route, ...]
    sanitize: Sanitize = Sanitize()
    limits: Limits = Limits()
    responses: Responses = Responses()
    identity: Identity = Identity()
    xfcc: Xfcc = Xfcc()
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
        read = {*self.sanitize.policy_headers, self.posture.header}
        for i, name in enumerate(self.listener.memo_volatile_headers):
            if name in read:
                why = "the posture header" if name == self.posture.header else "in sanitize.policy_headers"
                out.append((("listener", "memo_volatile_headers", i), f"{name!r} is {why}: the walk reads it"))
        return out
