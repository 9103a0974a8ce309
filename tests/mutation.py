"""`make mutate`: mutation testing of the security checks, one module at a time.

mutmut plants one small bug at a time (a flipped comparison, a dropped
``not``, a changed constant…) in a copy of the package and runs the tests
that exercise the mutated function; a mutant that leaves them green is a
check no test holds.

Why a driver around mutmut: mutmut wants the package under ``src/`` (it
derives module names from the file path), and each module here has its own
small set of relevant tests, so a mutant runs in seconds rather than the
whole suite.  For each module the driver lays out a staging copy
(``.mutation/<module>/``: ``src/vvault_pep``, tests, examples, policies and a
``pyproject.toml`` with that module's ``[tool.mutmut]`` section), runs
``mutmut run`` there under a time budget, and writes the counts and the
survivors to ``.mutation/<module>/summary.json`` and stdout.  Tests that
start ``vvault-pep serve`` as a subprocess see the mutant too:
``PYTHONPATH`` points at the mutated copy and mutmut's
``MUTANT_UNDER_TEST`` is inherited.

Survivors that cannot be killed (equivalent mutants) are listed, with the
reason, in ``EQUIVALENT`` below and in docs/mutation.md.  Mutant numbers
are stable as long as the module's source is unchanged; after an edit,
re-read the survivors (``mutmut show NAME`` in the staging directory).

Usage::

    python -m tests.mutation                      # every module in MODULES
    python -m tests.mutation core.decision core.sanitize   # only these
    python -m tests.mutation --budget-s 600       # overall wall-clock budget
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGE = ROOT / ".mutation"

# module (dotted, under vvault_pep) → the tests that exercise it (unit tables first: they are the fast killers).
MODULES: dict[str, list[str]] = {
    "core.principal": ["tests/test_principal.py", "tests/test_proofs_principal.py", "tests/test_containment.py"],
    "core.responses": ["tests/test_responses.py", "tests/test_proofs_responses.py"],
    "decide.inflight": ["tests/test_slow_bodies.py", "tests/test_proofs_inflight.py"],
    "core.body": ["tests/test_proofs_body.py", "tests/test_body_policy.py"],
    "edge.body": ["tests/test_proofs_body.py", "tests/test_body_policy.py"],
    "core.xfcc": ["tests/test_proofs_xfcc.py", "tests/test_xfcc.py"],
    "identity.posture": ["tests/test_proofs_posture.py", "tests/test_posture_risk.py"],
    "core.decision": ["tests/test_enforce.py", "tests/test_proofs_enforce.py", "tests/test_proofs_decisions.py"],
    "core.obligations": [
        "tests/test_proofs_obligations.py",
        "tests/test_enforce.py",
        "tests/test_proofs_decisions.py",
        "tests/test_containment.py",
        "tests/test_registries.py",
    ],
    "core.sanitize": ["tests/test_sanitize_headers.py", "tests/test_sanitize.py", "tests/test_proofs_sanitize.py"],
    "observe.audit": [
        "tests/test_proofs_redaction.py",
        "tests/test_audit.py",
        "tests/test_proofs_audit.py",
        "tests/test_redact.py",
    ],
    "observe.sinks": [
        "tests/test_proofs_sinks.py",
        "tests/test_proofs_otlp_sink.py",
        "tests/test_audit.py",
        "tests/test_proofs_audit.py",
        "tests/test_input_hardening.py",
    ],
    "identity.authn": ["tests/test_proofs_authn.py", "tests/test_authn.py", "tests/test_input_hardening.py"],
    "identity.jwt": ["tests/test_proofs_jwt.py", "tests/test_authn.py", "tests/test_input_hardening.py"],
    "identity.jwks": ["tests/test_proofs_jwks.py", "tests/test_authn.py"],
    "core.spiffe": [
        "tests/test_proofs_spiffe.py",
        "tests/test_spiffe.py",
        "tests/test_listener.py",
        "tests/test_proofs_identity.py",
    ],
    "edge.listener": [
        "tests/test_listener.py",
        "tests/test_hardening.py",
        "tests/test_tls_hardening.py",
        "tests/test_proofs_identity.py",
    ],
    "core.request": [
        "tests/test_proofs_request.py",
        "tests/test_listener.py",
        "tests/test_hardening.py",
        "tests/test_tls_hardening.py",
        "tests/test_proofs_identity.py",
    ],
    "shared.containment": [
        "tests/test_containment.py",
        "tests/test_containment_holds.py",
        "tests/test_proofs_cache.py",
    ],
    "edge.upstream_http": ["tests/test_upstream_http.py", "tests/test_proofs_forward.py"],
    "edge.forward": [
        "tests/test_proofs_forward.py",
        "tests/test_responses.py",
        "tests/test_pipeline.py",
        "tests/test_streaming.py",
    ],
    # last: the cache key composition and the PDP client are still moving elsewhere
    "decide.cache": ["tests/test_cache.py", "tests/test_proofs_cache.py"],
    "decide.pdp": ["tests/test_proofs_opa_client.py", "tests/test_pdp.py", "tests/test_proofs_pdp.py"],
}


def source(module: str) -> str:
    """The module's file under the staged ``src/``: ``core.decision`` → ``src/vvault_pep/core/decision.py``."""
    return f"src/vvault_pep/{module.replace('.', '/')}.py"


# mutant name → why no test can tell it from the original.
EQUIVALENT: dict[str, str] = {
    "vvault_pep.core.xfcc.x__split__mutmut_6": "`escaped = None` is as false as `False`",
    "vvault_pep.core.xfcc.x__unquote__mutmut_12": "a quoted value that does not end in a quote has its closing"
    " quote inside, which the loop refuses with the same reason",
    "vvault_pep.core.xfcc.x_accept__mutmut_18": "codec names are case-insensitive: 'UTF-8' is 'utf-8'",
    "vvault_pep.core.xfcc.x_forwarded_peer__mutmut_93": "base64url of 32 bytes ends in one of AEIMQUYcgkosw048"
    " before its '=': stripping 'X' as well never changes it",
    "vvault_pep.core.xfcc.x_forwarded_peer__mutmut_95": "codec names are case-insensitive: 'ASCII' is 'ascii'",
    **{
        f"vvault_pep.identity.posture.xǁPostureVerifierǁ__init____mutmut_{n}": "the realm only goes into a 400/401"
        " challenge; posture turns every such refusal into data (`verified: false`), so no client sees it"
        for n in (5, 10, 11)
    },
    "vvault_pep.identity.posture.xǁPostureVerifierǁassess__mutmut_68": "the age is a float from time.time(): an"
    " assertion exactly max_age_s old cannot be produced",
    **{
        f"vvault_pep.core.body.x_is_json__mutmut_{n}": "only the part before the first ';' is read: `split(';')[0]`"
        " and `split(';', 2)[0]` are that part too"
        for n in (8, 11)
    },
    "vvault_pep.edge.body.x_inspect__mutmut_86": "`parse` tests `not complete`: None and False take the same branch",
    **{
        f"vvault_pep.edge.body.x_inspect__mutmut_{n}": "the `sanitize.malformed` branch: a framing error in the"
        " middle of a body is answered 400 by aiohttp's server itself, which closes the connection; no"
        " client sees this code or detail (a client that leaves is a ConnectionResetError, handled above)"
        for n in range(58, 66)
    },
    **{
        f"vvault_pep.core.responses.x_cookie_passes__mutmut_{n}": "only the part before the first '=' is read:"
        " `split('=')[0]` and `split('=', 2)[0]` are that part too"
        for n in (25, 28)
    },
    "vvault_pep.core.responses.x_partial_reason__mutmut_26": "'multipart/byteranges' holds no ';': a value starts"
    " with it exactly when its first ';'-separated part does",
    "vvault_pep.core.principal.x_subject_of__mutmut_42": "`workload_tenants.get(None)` is None: the mapping is"
    " keyed by SPIFFE IDs (str), so asking it without a workload finds nothing either way",
    "vvault_pep.core.decision.x__deny__mutmut_10": "no caller passes `status`:"
    " the default branch is the only one reached",
    **{
        f"vvault_pep.core.decision.x_refusal_of__mutmut_{n}": "the fallback title is overwritten on the next line"
        " whenever it is used (code not in STATUS)"
        for n in (6, 7, 8)
    },
    **{
        f"vvault_pep.core.sanitize.x__percent_decode__mutmut_{n}": "the ValueError's message is never read:"
        " the query parser answers every ValueError with its own detail, and a path segment reaches the"
        " decoder only after the path's own percent check"
        for n in (21, 22, 23)
    },
    "vvault_pep.core.sanitize.x__percent_decode__mutmut_37": "codec names are case-insensitive: 'ASCII' is 'ascii'",
    **{
        f"vvault_pep.core.sanitize.x__parse_query__mutmut_{n}": "codec names are case-insensitive: 'UTF-8' is 'utf-8'"
        for n in (40, 51)
    },
    "vvault_pep.core.sanitize.x__parse_query__mutmut_1": "the default of `max_params` is never used: the only"
    " caller, canonical_target, always passes its own (whose default is tested)",
    "vvault_pep.core.sanitize.x__decode_segment__mutmut_6": "codec names are case-insensitive: 'UTF-8' is 'utf-8'",
    "vvault_pep.core.sanitize.x_check_headers__mutmut_21": "codec names are case-insensitive: 'ASCII' is 'ascii'",
    "vvault_pep.core.sanitize.x_check_headers__mutmut_25": "codec names are case-insensitive: 'UTF-8' is 'utf-8'",
    "vvault_pep.core.request.x_parse_peer__mutmut_96": "base64url of 32 bytes ends in one of AEIMQUYcgkosw048"
    " before its '=': stripping 'X' as well never changes it",
    "vvault_pep.core.request.x_parse_peer__mutmut_98": "codec names are case-insensitive: 'ASCII' is 'ascii'",
    "vvault_pep.core.sanitize.x_canonical_target__mutmut_50": "without '?' the query is '', and parsing ''"
    " gives no parameters, exactly like not parsing it",
    **{
        f"vvault_pep.core.sanitize.x__remove_dot_segments__mutmut_{n}": "the initial `trailing` is never read: a"
        " path starts with '/', so the loop runs at least once and every branch sets `trailing` or raises"
        for n in (6, 7)
    },
    **{
        f"vvault_pep.core.sanitize.x__remove_dot_segments__mutmut_{n}": "only the part before the first ';' is"
        " read: `split(';')[0]` and `split(';', 2)[0]` are that part too"
        for n in (19, 22)
    },
    "vvault_pep.core.sanitize.x__split_host__mutmut_5": "the Host pattern allows one ']' only: partition and"
    " rpartition split at the same place",
    "vvault_pep.core.sanitize.x__split_host__mutmut_10": "after ']' the Host pattern allows only ':digits' or"
    " nothing: when `rest` does not start with ':' it is '', and `''[1:]` is '' as well",
    "vvault_pep.core.sanitize.x__split_host__mutmut_22": "the Host value is lower-cased before: it has no 'X'"
    " for `rstrip('XX.XX')` to strip beyond the dots",
    **{
        f"vvault_pep.observe.audit.x_redact__mutmut_{n}": "any `query` mode other than 'keep' and 'erase' masks:"
        " a default of 'XXmaskXX' or 'MASK' masks exactly as 'mask' does"
        for n in (1, 2)
    },
    **{
        f"vvault_pep.observe.audit.x_redact__mutmut_{n}": "the 'request.query' path only makes `request` a"
        " fresh copy, and the always-erased 'request.headers.*' paths already copy `request` whenever it is an object"
        for n in (10, 11)
    },
    "vvault_pep.observe.audit.x__copy_paths__mutmut_4": "`fresh` starting without id(out) only matters if `out`"
    " were a child of itself: `out` is a new dict, no object in the input can contain it",
    **{
        f"vvault_pep.observe.audit.x__copy_paths__mutmut_{n}": "`fresh` no longer remembering a copy (or always"
        " copying) copies a dict on two paths twice: the second copy replaces the first before anything is"
        " erased or masked, so the result and the untouched input are the same"
        for n in (12, 17, 18)
    },
    "vvault_pep.observe.audit.x_configure_logging__mutmut_4": "`StreamHandler(None)` writes to sys.stderr,"
    " read at the same moment as `StreamHandler(sys.stderr)`",
    **{
        f"vvault_pep.observe.audit.xǁJsonLinesǁformat__mutmut_{n}": "a record limit of 2 TiB instead of 1 TiB:"
        " no log record comes near either"
        for n in (16, 17)
    },
    **{
        f"vvault_pep.observe.audit.xǁJsonLinesǁformat__mutmut_{n}": "`encode` returns one JSON object and a"
        " newline: the line ends in '}\\n', so stripping 'X' or whitespace as well strips the same newline"
        for n in (9, 19)
    },
    **{
        f"vvault_pep.observe.sinks.x__scrub__mutmut_{n}": "codec names are case-insensitive: 'UTF-8' is 'utf-8'"
        for n in (4, 11, 15)
    },
    **{
        f"vvault_pep.observe.sinks.x_encode__mutmut_{n}": "the second `dumps` writes a scrubbed record: `_scrub`"
        " leaves only types orjson writes itself, so `default` is never called there"
        for n in (17, 20)
    },
    "vvault_pep.observe.sinks.xǁSinkǁ__init____mutmut_22": "`_stopping = None` is as false as `False`",
    **{
        f"vvault_pep.observe.sinks.xǁ_FileSinkǁ__init____mutmut_{n}": "the initial `_size` is never read:"
        " the first write opens the file, and `_open` sets `_size` from it"
        for n in (11, 12)
    },
    **{
        f"vvault_pep.observe.sinks.xǁ_FileSinkǁ_open__mutmut_{n}": "the fallback when fstat fails: fstat of the"
        " descriptor `open` just returned does not fail"
        for n in (10, 11)
    },
    **{
        f"vvault_pep.observe.sinks.xǁ_OtlpSinkǁwrite__mutmut_{n}": "`encode` returns one JSON object and a"
        " newline: the line ends in '}\\n', so stripping 'X' or whitespace as well strips the same newline"
        for n in (16, 20)
    },
    "vvault_pep.identity.jwt.x__b64json__mutmut_13": "`+len % 4` instead of `-len % 4` '=': non-strict base64"
    " decoding ignores padding past the end, and a segment of 4n+1 characters fails to decode either way",
    **{
        f"vvault_pep.identity.jwt.x__b64json__mutmut_{n}": "the ValueError's message is never read: precheck"
        " answers every ValueError with authn.malformed and the code's own title"
        for n in (3, 4, 5, 21, 22, 23)
    },
    **{
        f"vvault_pep.identity.jwt.x__encodable__mutmut_{n}": "the depth given with an object key is never read:"
        " JSON object keys are strings, and a string is judged before the depth is"
        for n in (24, 26, 27, 28)
    },
    "vvault_pep.identity.jwt.x__encodable__mutmut_4": "codec names are case-insensitive: 'UTF-8' is 'utf-8'",
    **{
        f"vvault_pep.identity.jwt.xǁJwtVerifierǁclaims__mutmut_{n}": "`verify_signature: True` is pyjwt's default:"
        " without the option the signature is verified just the same"
        for n in (38, 39)
    },
    **{
        f"vvault_pep.identity.jwt.xǁJwtVerifierǁprecheck__mutmut_{n}": "an empty header or payload segment that"
        " passes this check decodes to b'', which is not JSON: authn.malformed with the same title"
        for n in (20, 25)
    },
    "vvault_pep.identity.jwt.xǁJwtVerifierǁprecheck__mutmut_4": "the realm only goes into a 400/401 challenge;"
    " authn.token_too_large is a 431, which carries none",
    **{
        f"vvault_pep.identity.jwks.{name}": "the ValueError's message is never read: `_fetch` logs the"
        " exception's type only, and parse_jwks skips a key whose default algorithm is refused"
        for name in (
            "x__default_alg__mutmut_13",
            "x_parse_jwks__mutmut_5",
            "xǁKeySetǁ_discover__mutmut_16",
            "xǁKeySetǁ_discover__mutmut_17",
            "xǁKeySetǁ_discover__mutmut_18",
            "xǁKeySetǁ_discover__mutmut_34",
            "xǁKeySetǁ_discover__mutmut_35",
            "xǁKeySetǁ_discover__mutmut_36",
            "xǁKeySetǁ_get_json__mutmut_8",
            "xǁKeySetǁ_get_json__mutmut_14",
            "xǁKeySetǁ_get_json__mutmut_15",
            "xǁKeySetǁ_get_json__mutmut_16",
        )
    },
    **{
        f"vvault_pep.identity.jwks.{name}": "the fallback family of an algorithm not in _ALG_KTY: '' or 'XXXX',"
        " a parsed key's kty is RSA, EC or OKP (parse_jwks keeps no other), so neither ever matches"
        for name in ("x__default_alg__mutmut_6", "xǁKeyǁfits__mutmut_10")
    },
    **{f"vvault_pep.identity.jwks.xǁKeySetǁ__init____mutmut_{n}": "-1e+18 is -1e18" for n in (10, 13)},
    "vvault_pep.identity.jwks.xǁKeySetǁ__init____mutmut_7": "the initial `_expires_at` is only read when"
    " `_fetched_at` is set, and both are set by the same fetch",
    "vvault_pep.identity.jwks.xǁKeySetǁ_get_json__mutmut_12": "reading max+2 bytes instead of max+1: any"
    " document over the limit still reads more than the limit, and one within it is read whole either way",
    "vvault_pep.identity.jwks.xǁKeySetǁ_get_json__mutmut_2": "`allow_redirects=None` is as false as False:"
    " aiohttp follows a redirect only when it is true",
    **{
        f"vvault_pep.identity.jwks.xǁKeySetǁ_get_json__mutmut_{n}": "HTTP header names are case-insensitive"
        " (aiohttp's CIMultiDict)"
        for n in (24, 25)
    },
    "vvault_pep.identity.jwks.xǁKeySetǁ_get_json__mutmut_26": "without Cache-Control, 'XXXX' holds no max-age"
    " any more than '' does",
    **{
        f"vvault_pep.identity.authn.xǁAuthenticatorǁauthenticate__mutmut_{n}": "the last check cannot be"
        " reached: a route that needs a user and has none was refused by the first check (authn.required)"
        for n in range(80, 90)
    },
    "vvault_pep.identity.authn.xǁAuthenticatorǁ_remember__mutmut_5": "`popitem(last=None)` is as false as"
    " `last=False`: the oldest entry goes",
    "vvault_pep.decide.pdp.xǁPdpClientǁ__init____mutmut_1": "`self._opa` is never read after __init__",
    "vvault_pep.decide.pdp.xǁPdpClientǁ__init____mutmut_26": "URL schemes and host names are case-insensitive:"
    " yarl lower-cases 'HTTP://OPA' to 'http://opa'",
    **{
        f"vvault_pep.decide.pdp.xǁPdpClientǁ__init____mutmut_{n}": "the initial `tls` is only used for an"
        " http:// OPA, which is reached without TLS whatever `ssl` says; https:// replaces it with a context"
        for n in (27, 28)
    },
    **{
        f"vvault_pep.decide.pdp.{name}": "HTTP header names are case-insensitive (aiohttp's CIMultiDict and istr)"
        for name in (
            "xǁPdpClientǁ__init____mutmut_53",
            "xǁPdpClientǁ__init____mutmut_54",
            "xǁPdpClientǁ__init____mutmut_68",
            "xǁPdpClientǁ__init____mutmut_69",
            "xǁPdpClientǁ__init____mutmut_71",
            "xǁPdpClientǁ__init____mutmut_72",
            "xǁPdpClientǁdecide__mutmut_24",
            "xǁPdpClientǁdecide__mutmut_25",
            "xǁPdpClientǁ_put__mutmut_16",
            "xǁPdpClientǁ_put__mutmut_17",
        )
    },
    **{
        f"vvault_pep.decide.pdp.{name}": "aiohttp upper-cases the request method: 'put' is sent as PUT"
        for name in ("xǁPdpClientǁ_put__mutmut_3", "xǁPdpClientǁdelete_data__mutmut_13")
    },
    "vvault_pep.decide.pdp.xǁPdpClientǁ__init____mutmut_58": "`auto_decompress=None` is as false as False:"
    " aiohttp decompresses only when it is true",
    "vvault_pep.decide.pdp.xǁPdpClientǁdelete_data__mutmut_2": "`_put` sends `body or None`: b'' and None"
    " both send no body",
    "vvault_pep.observe.audit.xǁJsonLinesǁformat__mutmut_56": "logging fills exc_info from sys.exc_info():"
    " its type and value are None together or set together",
}

_STATUS = re.compile(r"^\s*(\S+__mutmut_\d+): (.+)$")


def stage(module: str, tests: list[str]) -> Path:
    """A fresh staging copy in the src/ layout mutmut expects."""
    work = STAGE / module
    if work.exists():
        shutil.rmtree(work)
    (work / "src").mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.so")
    shutil.copytree(ROOT / "proxy" / "vvault_pep", work / "src" / "vvault_pep", ignore=ignore)
    for name in ("tests", "examples", "policies", "docs"):
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    existing = [t for t in tests if (ROOT / t).exists()]
    section = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["src/vvault_pep/"]',
            f'only_mutate = ["{source(module)}"]',
            'also_copy = ["examples/", "policies/", "docs/"]',
            f"pytest_add_cli_args_test_selection = {json.dumps(existing)}",
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:randomly", "-q"]',
            "timeout_multiplier = 5.0",
            "timeout_constant = 10.0",
            "use_git_change_detection = false",
            "",
        ]
    )
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + section)
    return work


def results(work: Path, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    found: dict[str, str] = {}
    for line in out.splitlines():
        if m := _STATUS.match(line):
            found[m.group(1)] = m.group(2).strip()
    return found


def run_module(module: str, budget_s: float, workers: int) -> dict[str, object]:
    work = stage(module, MODULES[module])
    # Made before mutmut starts: a PYTHONPATH entry that does not exist yet at start-up is
    # cached as absent, and the tests would import the original package instead.
    (work / "mutants" / "src").mkdir(parents=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(work / "mutants" / "src"),
        "OPA_BIN": os.environ.get("OPA_BIN", str(ROOT / ".tools" / "bin" / "opa")),
        "VVAULT_PEP_PURE": "1",  # the mutated .py files run, never an extension compiled from the originals
    }
    env.pop("COVERAGE_PROCESS_START", None)  # no coverage inside mutants
    started = time.monotonic()
    timed_out = False
    for attempt in (1, 2):
        try:
            subprocess.run(
                [sys.executable, "-m", "mutmut", "run", "--max-children", str(workers)],
                cwd=work,
                env=env,
                timeout=max(budget_s - (time.monotonic() - started), 1),
                check=False,
                stdout=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            timed_out = True
        status = results(work, env)
        # mutmut stops before any mutant when its clean run fails; a timing test on busy
        # cores can do that once (the first run also compiles the trampolined copy): again.
        if timed_out or attempt == 2 or any(s != "not checked" for s in status.values()):
            break
    killed = sum(1 for s in status.values() if s in ("killed", "timeout"))
    survivors = sorted(n for n, s in status.items() if s == "survived")
    equivalent = [n for n in survivors if n in EQUIVALENT]
    alive = [n for n in survivors if n not in EQUIVALENT]
    unchecked = sorted(n for n, s in status.items() if s not in ("killed", "timeout", "survived"))
    judged = killed + len(alive)
    summary: dict[str, object] = {
        "module": module,
        "tests": MODULES[module],
        "mutants": len(status),
        "killed": killed,
        "equivalent": equivalent,
        "survived": alive,
        "not_run": unchecked,
        "kill_ratio": round(killed / judged, 4) if judged else None,
        "seconds": round(time.monotonic() - started, 1),
        "budget_exhausted": timed_out,
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--budget-s", type=float, default=3600, help="overall wall-clock budget (default 1 h)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args(argv)
    modules = args.modules or list(MODULES)
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s): {', '.join(unknown)}")
    deadline = time.monotonic() + args.budget_s
    failed = False
    print(f"{'module':<20} {'mutants':>7} {'killed':>6} {'equiv':>5} {'alive':>5} {'ratio':>7} {'s':>6}")
    for i, module in enumerate(modules):
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"{module:<20} skipped: the budget is spent")
            failed = True
            continue
        # share what is left fairly among the modules still to run
        s = run_module(module, left / (len(modules) - i), args.workers)
        ratio = s["kill_ratio"]
        shown = f"{ratio:.1%}" if isinstance(ratio, float) else "-"
        print(
            f"{module:<20} {s['mutants']:>7} {s['killed']:>6} {len(s['equivalent']):>5}"  # type: ignore[arg-type]
            f" {len(s['survived']):>5} {shown:>7} {s['seconds']:>6}"  # type: ignore[arg-type]
        )
        for name in s["survived"]:  # type: ignore[attr-defined]
            print(f"    survived: {name}")
        if s["survived"]:
            print(f"    read one: cd {STAGE / module} && mutmut show NAME")
        if s["budget_exhausted"] or s["not_run"]:
            print(f"    {len(s['not_run'])} mutant(s) not run within the budget")  # type: ignore[arg-type]
        failed = failed or bool(s["survived"]) or bool(s["budget_exhausted"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
