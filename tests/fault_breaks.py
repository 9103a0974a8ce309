"""Does each test the README fault table names fail when its row's behaviour breaks?

For every row (and a few promises beside the table): one deliberate bug (a
text substitution in one module), applied to a copy of the package in
``.mutation/faults/``, and the row's tests run against that copy
(``PYTHONPATH`` puts it first, for the CLI subprocesses too).  A row passes
when the tests fail on the bug.  The working tree is never
touched.  A substitution whose text is gone (the code moved) is reported as
``stale`` — update it beside the code.

    python -m tests.fault_breaks            # every row
    python -m tests.fault_breaks 413 pdp    # rows whose name contains one of these
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".mutation" / "faults"


@dataclass(frozen=True)
class Break:
    row: str
    module: str
    old: str
    new: str
    tests: tuple[str, ...]
    # further substitutions in the same module, for a behaviour two checks hold
    more: tuple[tuple[str, str], ...] = ()


BREAKS = (
    Break(
        "tls: no client certificate",
        "edge/listener.py",
        'ssl.CERT_REQUIRED if tls.client_auth == "required"',
        'ssl.CERT_OPTIONAL if tls.client_auth == "required"',
        ("tests/test_listener.py::test_client_without_certificate_fails_the_handshake",),
    ),
    Break(
        "tls: two SPIFFE IDs in one certificate",
        "core/request.py",
        "    if spiffe and len(uris) > 1:",
        "    if False:",
        ("tests/test_proofs_identity.py",),
    ),
    Break(
        "401: invalid token",
        "identity/authn.py",
        "token = _bearer(authorization, realm)",
        "token = None",
        ("tests/test_authn.py::test_bad_tokens_are_rejected_without_reaching_upstream",),
    ),
    Break(
        "jwks: staleness limit",
        "identity/jwks.py",
        "self.clock() - self._fetched_at <= self.issuer.jwks.max_staleness_s",
        "True",
        ("tests/test_authn.py::test_idp_down_keeps_cached_keys_until_max_staleness",),
    ),
    Break(
        "403: policy says no",
        "app/stages.py",
        "            if enforced:\n                refusal = enforce.refusal_of(decision)",
        "            if False:\n                refusal = enforce.refusal_of(decision)",
        ("tests/test_pipeline.py::test_denied_request_gets_problem_json_and_never_reaches_upstream",),
    ),
    Break(
        "403: malformed decision (monitor_only not a bool)",
        "core/decision.py",
        "        if not isinstance(monitor_only, bool):",
        "        if False:",
        ("tests/test_proofs_decisions.py",),
    ),
    Break(
        "403: malformed decision (NUL in a header value)",
        "core/decision.py",
        'any(c in val for c in "\\r\\n\\x00")',
        'any(c in val for c in "\\r\\n")',
        ("tests/test_proofs_decisions.py",),
    ),
    Break(
        "403: undefined or malformed, never cached",
        "app/stages.py",
        'if layer == "miss" and fresh and answer.defined and decision.code not in NEVER_CACHED:',
        'if layer == "miss" and fresh:',
        ("tests/test_proofs_cache.py::test_undefined_and_malformed_answers_are_never_cached",),
    ),
    Break(
        "403: unknown obligation",
        "core/decision.py",
        "    if obligations is None:\n",
        "    if False:\n",
        ("tests/test_pipeline.py::test_decision_shapes_from_real_opa",),
    ),
    Break(
        "503 pdp: deadline multiplied",
        "decide/pdp.py",
        "self._deadline = opa.timeout_ms / 1000",
        "self._deadline = opa.timeout_ms / 1000 * 8",
        ("tests/test_proofs_pdp.py::test_a_silent_opa_is_given_up_at_the_deadline_once",),
    ),
    Break(
        "503 pdp: a retry on an answered error",
        "decide/pdp.py",
        "        if status != 200:\n            log.warning(",
        "        if status != 200:\n"
        '            again = await self._pool().request("POST", target, sent, body)\n'
        "            raw, status = await again.read(ANSWER_LIMIT), again.status\n"
        "            again.release()\n"
        "        if status != 200:\n            log.warning(",
        ("tests/test_proofs_pdp.py::test_an_answered_error_gets_exactly_one_post",),
    ),
    Break(
        "503 pdp: OPA unreachable",
        "decide/pdp.py",
        'raise PepError("pdp.unavailable", "the policy decision point is unreachable") from exc',
        'raise PepError("pdp.error", "the policy decision point is unreachable") from exc',
        ("tests/test_pdp.py::test_opa_stopped_is_503",),
    ),
    Break(
        "502: upstream refuses",
        "edge/forward.py",
        'raise PepError("upstream.unavailable", "the upstream refused the connection") from exc',
        'raise PepError("upstream.timeout", "the upstream refused the connection") from exc',
        ("tests/test_pipeline.py::test_upstream_down_is_502",),
    ),
    Break(
        "504: upstream times out",
        "edge/forward.py",
        'raise PepError("upstream.timeout", "the upstream did not answer in time") from exc',
        'raise PepError("upstream.unavailable", "the upstream did not answer in time") from exc',
        ("tests/test_pipeline.py::test_upstream_timeout_is_504",),
    ),
    Break(
        "response: Connection-named headers",
        "core/responses.py",
        "if low in HOP_BY_HOP or low in connection_named or low in PEP_OWNED",
        "if low in HOP_BY_HOP or low in PEP_OWNED",
        ("tests/test_proofs_forward.py::test_response_headers_named_by_connection_stay_with_the_upstream_hop",),
    ),
    Break(
        "aborted: upstream dies mid-response",
        "edge/forward.py",
        'return out, Outcome(upstream.status, budget.count, sent, "upstream_failed")',
        "return out, Outcome(upstream.status, budget.count, sent)",
        ("tests/test_proofs_forward.py::test_upstream_dying_mid_response_cuts_the_client_and_is_recorded",),
    ),
    Break(
        "502: upstream mTLS certificate",
        "edge/forward.py",
        "        ctx.load_cert_chain(str(up.tls.cert_file), str(up.tls.key_file))",
        "        pass",
        ("tests/test_proofs_forward.py::test_upstream_mtls_presents_the_pep_certificate",),
    ),
    Break(
        "400: ambiguous path",
        "core/sanitize.py",
        '        if ";" in part and part.split(";", 1)[0] in ("", ".", ".."):',
        "        if False:",
        ("tests/test_proofs_sanitize.py",),
    ),
    Break(
        "413: declared body too large",
        "app/stages.py",
        "headers.content_length > self.max_body_any",
        "headers.content_length > self.max_body_any * 2",
        ("tests/test_proofs_forward.py::test_declared_oversize_body_is_413_before_routing",),
    ),
    Break(
        "413: chunked body too large",
        "edge/forward.py",
        "        budget.count += len(chunk)\n        if budget.count > budget.limit:",
        "        budget.count += len(chunk)\n        if False:",
        ("tests/test_proofs_forward.py::test_oversize_chunked_body_is_cut_and_never_stored",),
    ),
    Break(
        "managed OPA: backoff",
        "edge/opa_supervisor.py",
        "backoff = min(backoff * 2, 5.0)",
        "backoff = min(backoff * 1, 5.0)",
        ("tests/test_proofs_pdp.py::test_managed_opa_down_is_503_then_backs_off_and_recovers",),
    ),
    Break(
        "redis down: local invalidation",
        "decide/cache.py",
        "self._local_bumps[pair] = self._local_bumps.get(pair, 0) + 1",
        "pass",
        ("tests/test_proofs_cache.py::test_redis_down_invalidation_and_data_push_hold_here_and_for_good",),
    ),
    Break(
        "redis down: local revision bump",
        "decide/cache.py",
        "        self._local_revision_bumps += 1",
        "        pass",
        ("tests/test_proofs_cache.py::test_redis_down_invalidation_and_data_push_hold_here_and_for_good",),
    ),
    Break(
        "redis down: local quarantine",
        "shared/containment.py",
        "            if local is not None and local.until > now:\n                hits.append(local)",
        "            if False:\n                hits.append(local)",
        ("tests/test_containment.py::test_redis_down_keeps_local_containment_and_a_local_limit",),
    ),
    Break(
        "quarantine: before the cache",
        "app/stages.py",
        "                contained.raise_if_held()\n                x.cache_context = await pending[2]",
        "                x.cache_context = await pending[2]",
        ("tests/test_proofs_cache.py::test_a_quarantine_from_redis_beats_a_cached_allow_without_any_reset",),
        more=(
            (
                '        trail.fields["cache"] = layer\n',
                '        trail.fields["cache"] = layer\n'
                '        if layer not in ("l1", "l2"):\n'
                "            x.contained.raise_if_held()\n",
            ),
        ),
    ),
    Break(
        "cache: the route in the key",
        "decide/cache.py",
        'digest("entry", route.policy, route.name, ',
        'digest("entry", route.policy, ',
        ("tests/test_proofs_cache.py::test_two_routes_with_the_same_projection_never_share_an_entry",),
    ),
    Break(
        "audit: the bearer token erased",
        "observe/audit.py",
        '    "request.headers.authorization",\n',
        "",
        ("tests/test_proofs_audit.py",),
    ),
    Break(
        "redaction: max_redact_bytes",
        "edge/forward.py",
        "        if declared is not None and declared > limit:",
        "        if declared is not None and declared > limit * 2:",
        ("tests/test_proofs_redact.py",),
        more=(
            ("raw = await upstream.read(limit)", "raw = await upstream.read(limit * 2)"),
            ("        if len(raw) > limit:", "        if len(raw) > limit * 2:"),
        ),
    ),
    Break(
        "posture: device keys unavailable",
        "identity/posture.py",
        '            if err.code == "authn.keys_unavailable":\n                raise',
        "            if False:\n                raise",
        ("tests/test_proofs_posture.py",),
    ),
    Break(
        "quarantine: an unverified device is no scope",
        "core/principal.py",
        '    if device is not None and device.get("verified") is True:',
        "    if device is not None:",
        ("tests/test_proofs_principal.py",),
    ),
    Break(
        "response: partial answers on a redacted route",
        "core/responses.py",
        "    if status == 206:\n        return",
        "    if False:\n        return",
        ("tests/test_responses.py",),
    ),
    Break(
        "upstream framing: a malformed answer",
        "net/http1.py",
        '            self._fail(UpstreamFailure(f"malformed answer: {exc}"))',
        "            pass",
        ("tests/test_upstream_http.py",),
    ),
    Break(
        "response: fingerprinting and debug headers",
        "core/responses.py",
        "        elif low in policy.drop or low.startswith(policy.drop_prefixes):",
        "        elif False:",
        ("tests/test_responses.py::test_a_misbehaving_upstreams_headers_stop_at_the_pep",),
    ),
    Break(
        "slow bodies: the body deadline",
        "edge/forward.py",
        "            async with asyncio.timeout(min(budget.idle_s, left)):",
        "            async with asyncio.timeout(budget.idle_s):",
        ("tests/test_proofs_slow_bodies.py",),
    ),
    Break(
        "slow bodies: the in-flight limit",
        "decide/inflight.py",
        "            if self._counts.get(key, 0) >= limit:",
        "            if False:",
        ("tests/test_slow_bodies.py",),
    ),
    Break(
        "config: an OTLP exporter not installed",
        "config/models.py",
        "    if found:\n        return None",
        "    if True:\n        return None",
        ("tests/test_packaging.py",),
    ),
    Break(
        "body: not JSON",
        "edge/body.py",
        "    if len(types) != 1 or not is_json(types[0]):",
        "    if False:",
        ("tests/test_body_policy.py",),
    ),
    Break(
        "xfcc: from a client that is not a trusted proxy",
        "core/xfcc.py",
        "if proxy is None or not cfg.trusted_proxies or not trusted(cfg, proxy):",
        "if proxy is None or not cfg.trusted_proxies:",
        ("tests/test_xfcc.py",),
    ),
    Break(
        "decision log: attempts are bounded, the rest counted",
        "observe/decision_log.py",
        "            if attempt >= self.cfg.max_attempts or self._stopping:",
        "            if self._stopping:",
        ("tests/test_decision_log.py::test_http_sink_counts_what_it_cannot_deliver",),
    ),
    Break(
        "opa: token authentication",
        "decide/pdp.py",
        '        auth = {"Authorization": f"Bearer {opa.token}"} if opa.token else None',
        "        auth = None",
        ("tests/test_conventions.py::test_opa_with_token_authentication",),
    ),
    Break(
        "redis restarted empty: quarantines written back",
        "shared/containment.py",
        "            if theirs is None or theirs.until < q.until - 1.0:\n                writes.append(q)",
        "            if False:\n                writes.append(q)",
        ("tests/test_containment_holds.py::test_redis_restarted_empty_lifts_nothing_and_gets_every_quarantine_back",),
    ),
    Break(
        "quarantine: every scope checked",
        "shared/containment.py",
        "        pairs = subject.scopes\n",
        "        pairs = subject.scopes[:1]\n",
        ("tests/test_containment_holds.py::test_every_scope_holds_whatever_credentials_ride_with_it",),
    ),
    Break(
        "tls: a revoked certificate",
        "edge/listener.py",
        "        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN if tls.crl_check",
        "        ctx.verify_flags |= 0 if tls.crl_check",
        ("tests/test_tls_hardening.py::test_a_revoked_certificate_fails_the_handshake",),
    ),
    Break(
        "tls: an invalid SVID",
        "core/request.py",
        "    if spiffe:\n        try:\n            sid = parse_spiffe_id(spiffe[0])",
        "    if False:\n        try:\n            sid = parse_spiffe_id(spiffe[0])",
        ("tests/test_tls_hardening.py::test_an_invalid_svid_is_refused_even_where_a_user_token_is_enough",),
    ),
    Break(
        "tls: session resumption",
        "edge/listener.py",
        "    ctx.options |= ssl.OP_NO_TICKET\n    ctx.num_tickets = 0\n    if not disable_session_cache(ctx):",
        "    if False:",
        ("tests/test_tls_hardening.py::test_sessions_never_resume",),
        more=(("        if ssl_object.session_reused:", "        if False:"),),
    ),
    Break(
        "strict claims: a NumericDate that is a string",
        "identity/jwt.py",
        "        if name in payload and (isinstance(value, bool) or not isinstance(value, int | float)):",
        "        if False:",
        ("tests/test_input_hardening.py::test_loosely_typed_claims_are_refused_with_one_record",),
    ),
    Break(
        "audit: a record past max_record_bytes",
        "observe/sinks.py",
        "    if len(line) <= max_bytes:\n        return line, escaped, False",
        "    if True:\n        return line, escaped, False",
        ("tests/test_input_hardening.py::test_an_oversized_record_is_cut_and_marked",),
    ),
    Break(
        "400: more than max_query_params",
        "core/sanitize.py",
        '    if query.count("&") >= max_params:',
        "    if False:",
        ("tests/test_input_hardening.py::test_too_many_query_parameters_is_400",),
    ),
    Break(
        "serve: the pure-Python HTTP parser",
        "app/cli.py",
        "        if problem is not None and not args.allow_python_http_parser:",
        "        if False:",
        ("tests/test_input_hardening.py::test_serve_refuses_the_pure_python_parser",),
    ),
    Break(
        "managed OPA: a private socket",
        "edge/opa_supervisor.py",
        "            os.chmod(self._dir, 0o700)",
        "            os.chmod(self._dir, 0o755)",
        ("tests/test_managed_opa.py",),
    ),
    Break(
        "admin: no certificate is a 401",
        "app/admin.py",
        '                status = 401 if no.code == "admin.no_certificate" else 403',
        "                status = 403",
        ("tests/test_admin_hardening.py",),
    ),
    Break(
        "config: errors name the line",
        "config/loader.py",
        'return ConfigError(f"{self.filename}:{node.start_mark.line + 1}: {field}: {message}")',
        'return ConfigError(f"{self.filename}:{node.start_mark.line}: {field}: {message}")',
        ("tests/test_config_hardening.py",),
    ),
    Break(
        "serve: a port in use is one line",
        "app/cli.py",
        '        print(f"vvault-pep: cannot start: {_one_line(exc)}", file=sys.stderr)\n'
        "        await runtime.stop()\n"
        "        return 1",
        "        raise",
        ("tests/test_config_hardening.py::test_a_port_in_use_is_exit_1_with_one_line",),
    ),
    Break(
        "push channel lost: per-request reads at once",
        "shared/push.py",
        "            and alive is not None\n            and alive()\n",
        "",
        ("tests/test_push.py::test_killing_the_subscription_falls_back_to_reads_at_once",),
        more=(
            (
                "    def _on_lost(self) -> None:\n        self._subscription = 0\n",
                "    def _on_lost(self) -> None:\n        return\n",
            ),
        ),
    ),
    Break(
        "push channel silent: reads after the heartbeat window",
        "shared/push.py",
        "            and time.monotonic() <= self._valid_until\n",
        "",
        ("tests/test_push.py::test_a_subscription_that_delivers_nothing_falls_back_within_the_window",),
    ),
)


def stage() -> None:
    if STAGE.exists():
        shutil.rmtree(STAGE)
    STAGE.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    for name in ("proxy", "tests", "examples", "policies", "docs"):
        shutil.copytree(ROOT / name, STAGE / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", STAGE / "pyproject.toml")


def pytest(tests: tuple[str, ...]) -> int:
    env = {
        **os.environ,
        "PYTHONPATH": str(STAGE / "proxy"),
        "OPA_BIN": os.environ.get("OPA_BIN", str(ROOT / ".tools" / "bin" / "opa")),
        "VVAULT_PEP_PURE": "1",  # the mutated .py files run, never an extension compiled from the originals
    }
    env.pop("COVERAGE_PROCESS_START", None)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=STAGE,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return run.returncode


def check(b: Break) -> str:
    target = STAGE / "proxy" / "vvault_pep" / b.module
    original = (ROOT / "proxy" / "vvault_pep" / b.module).read_text()
    broken = original
    for old, new in ((b.old, b.new), *b.more):
        if old not in broken:
            return "stale"
        broken = broken.replace(old, new)
    target.write_text(broken)
    try:
        returncode = pytest(b.tests)
    finally:
        target.write_text(original)
    # 1: tests failed (the bug is caught); 0: it went unnoticed; anything else: no verdict
    return {1: "caught", 0: "MISSED"}.get(returncode, f"error (pytest exit {returncode})")


def main(argv: list[str]) -> int:
    chosen = [b for b in BREAKS if not argv or any(a in b.row for a in argv)]
    stage()
    # The same tests pass on the unbroken copy, or "caught" would mean nothing.
    if pytest(tuple(dict.fromkeys(t for b in chosen for t in b.tests))) != 0:
        print("the named tests fail on the unbroken code: fix that first")
        return 2
    bad = 0
    for b in chosen:
        verdict = check(b)
        bad += verdict != "caught"
        print(f"{verdict:<8} {b.row:<52} {' '.join(b.tests)}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
