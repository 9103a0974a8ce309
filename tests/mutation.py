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
        "tests/test_proofs_listener.py",
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
        "tests/test_proofs_containment_state.py",
        "tests/test_proofs_containment.py",
        "tests/test_containment.py",
        "tests/test_containment_holds.py",
        "tests/test_proofs_cache.py",
    ],
    "net.http1": [
        "tests/test_proofs_upstream_http.py",
        "tests/test_upstream_http.py",
        "tests/test_proofs_forward.py",
        "tests/test_pdp_wire.py",
    ],
    "edge.forward": [
        "tests/test_proofs_forward_rules.py",
        "tests/test_proofs_forward.py",
        "tests/test_responses.py",
        "tests/test_pipeline.py",
        "tests/test_streaming.py",
    ],
    # last: the cache key composition and the PDP client are still moving elsewhere
    "decide.cache": [
        "tests/test_proofs_cache_state.py",
        "tests/test_proofs_cache_keys.py",
        "tests/test_cache.py",
        "tests/test_proofs_cache.py",
    ],
    "decide.pdp": [
        "tests/test_proofs_opa_client.py",
        "tests/test_pdp.py",
        "tests/test_proofs_pdp.py",
        "tests/test_pdp_wire.py",
    ],
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
    "vvault_pep.edge.body.x__inspect__mutmut_95": "`parse` tests `not complete`: None and False take the same branch",
    "vvault_pep.edge.body.x_inspect__mutmut_1": "the default deadline is never used: the only caller (the"
    " body stage) always passes the route's or the limits' deadline",
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
    "vvault_pep.core.sanitize.x__item__mutmut_4": "codec names are case-insensitive: 'ASCII' is 'ascii'",
    "vvault_pep.core.sanitize.x__item__mutmut_8": "codec names are case-insensitive: 'UTF-8' is 'utf-8'",
    "vvault_pep.core.sanitize.x_block_of__mutmut_10": "codec names are case-insensitive: 'UTF-8' is 'utf-8'",
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
    "vvault_pep.decide.pdp.xǁPdpClientǁ__init____mutmut_28": "URL schemes and host names are case-insensitive:"
    " yarl and urlsplit lower-case 'HTTP://OPA' to 'http://opa' (and the Host header is the host's)",
    **{
        f"vvault_pep.decide.pdp.xǁPdpClientǁ__init____mutmut_{n}": "the initial `tls` / `_tls` is only used for"
        " an http:// OPA, which is reached without TLS whatever `ssl` says; https:// replaces it with a context"
        for n in (14, 30, 31)
    },
    **{
        f"vvault_pep.decide.pdp.xǁPdpClientǁ__init____mutmut_{n}": "HTTP header names are case-insensitive"
        " (aiohttp's CIMultiDict and istr; OPA's Go server canonicalises them)"
        for n in (56, 57, 60, 61, 81, 82, 84, 85)
    },
    **{
        f"vvault_pep.decide.pdp.{name}": "HTTP header names are case-insensitive (aiohttp's CIMultiDict and istr)"
        for name in ("xǁPdpClientǁ_put__mutmut_16", "xǁPdpClientǁ_put__mutmut_17")
    },
    **{
        f"vvault_pep.decide.pdp.{name}": "aiohttp upper-cases the request method: 'put' is sent as PUT"
        for name in ("xǁPdpClientǁ_put__mutmut_3", "xǁPdpClientǁdelete_data__mutmut_13")
    },
    "vvault_pep.decide.pdp.xǁPdpClientǁ__init____mutmut_71": "`auto_decompress=None` is as false as False:"
    " aiohttp decompresses only when it is true",
    "vvault_pep.decide.pdp.xǁPdpClientǁ_pool__mutmut_5": "the lean pool's connect guard of 60 s: every"
    " decision runs under its own deadline (at most 60 s by the config's bound), which cuts a connect first",
    "vvault_pep.decide.pdp.xǁPdpClientǁdelete_data__mutmut_2": "`_put` sends `body or None`: b'' and None"
    " both send no body",
    "vvault_pep.observe.audit.xǁJsonLinesǁformat__mutmut_56": "logging fills exc_info from sys.exc_info():"
    " its type and value are None together or set together",
    # edge.listener
    **{
        f"vvault_pep.edge.listener.xǁ_StrictPyParserǁparse_message__mutmut_{n}": "only the part before the first"
        " space is read: `split(b' ')[0]` and `split(b' ', 2)[0]` are that part too"
        for n in (7, 11)
    },
    "vvault_pep.edge.listener.xǁ_StrictPyParserǁparse_message__mutmut_19": "codec names are case-insensitive:"
    " 'LATIN-1' is 'latin-1'",
    "vvault_pep.edge.listener.xǁ_Handlerǁhandle_error__mutmut_1": "aiohttp always passes the status (400 for"
    " what its parser refuses, 500 for a handler's exception, 504 for its timeout): the default is never used",
    "vvault_pep.edge.listener.xǁ_Handlerǁhandle_error__mutmut_3": "`output_size` is 0 or the length of at least"
    " a status line: once anything is written, the head went first, so `> 0` and `> 1` never differ",
    **{
        f"vvault_pep.edge.listener.xǁ_Handlerǁhandle_error__mutmut_{n}": "the ConnectionError's message is never"
        " read: aiohttp catches it as a premature disconnection and closes the connection without a word"
        for n in (4, 5, 6)
    },
    **{
        f"vvault_pep.edge.listener.xǁ_Handlerǁhandle_error__mutmut_{n}": "aiohttp calls handle_error with 400,"
        " 500 or 504 only: the 413 and 431 entries of the table are never looked up (431 comes from the"
        " LineTooLong rule below it, which the tests hold)"
        for n in (12, 13, 14, 15, 16, 17)
    },
    **{
        f"vvault_pep.edge.listener.xǁ_Handlerǁhandle_error__mutmut_{n}": "the text is only searched for"
        " 'Duplicate' and \"Missing 'Host'\": 'None' and 'XXXX' (without an exception) hold neither, as '' does"
        for n in (25, 28)
    },
    "vvault_pep.edge.listener.xǁ_Handlerǁhandle_error__mutmut_71": "a Refusal's detail None is answered as its"
    " title (`detail or title` in problem_body), which is what the detail was",
    **{
        f"vvault_pep.edge.listener.xǁ_Handlerǁhandle_error__mutmut_{n}": "HTTP field names are case-insensitive"
        " (RFC 9110, 5.1): `x-request-id` / `server` in another case are the same header to every client"
        for n in (95, 96, 99, 100)
    },
    **{
        f"vvault_pep.edge.listener.xǁ_Handlerǁhandle_error__mutmut_{n}": "while the handler's manager is set the"
        " transport is too (aiohttp clears both on connection_lost), and a live TCP transport always has a"
        " peername: the `else None` branches are never taken"
        for n in (108, 118)
    },
    "vvault_pep.edge.listener.x_server_context__mutmut_10": "CPython sets OP_NO_COMPRESSION and"
    " OP_CIPHER_SERVER_PREFERENCE on every new SSLContext already: dropping them from the `|=` changes nothing",
    "vvault_pep.edge.listener.x_disable_session_cache__mutmut_20": "SSL_CTX_ctrl(NULL, …) returns 0, which is"
    " SSL_SESS_CACHE_OFF, and so does reading a real SSL_CTX right after the SET that precedes it: the SET"
    " only assigns the mode, it cannot fail on a valid SSL_CTX",
    "vvault_pep.edge.listener.x_disable_session_cache__mutmut_27": "SSL_CTRL_GET_SESS_CACHE_MODE ignores its"
    " `larg` argument",
    **{
        f"vvault_pep.edge.listener.xǁ_Handlerǁdata_received__mutmut_{n}": "the ValueError's message is never"
        " read: both body readers answer any ValueError with their own `sanitize.malformed` detail"
        for n in (16, 17, 18)
    },
    **{
        f"vvault_pep.edge.listener.xǁMtlsServerǁconnection_lost__mutmut_{n}": "aiohttp's Server.connection_lost"
        " does not read `exc`"
        for n in (5, 7)
    },
    "vvault_pep.edge.listener.xǁMtlsServerǁconnection_made__mutmut_67": "connection_made runs after the"
    " handshake, when `cipher()` always names the negotiated cipher: the `else None` branch is never taken",
    "vvault_pep.edge.listener.xǁMtlsServerǁconnection_made__mutmut_2": "aiohttp's Server keeps the transport"
    " as the value of its connection table and never reads it (shutdown goes through the handlers)",
    "vvault_pep.edge.listener.xǁ_Handlerǁdata_received__mutmut_6": "with as many messages as before, the slice"
    " `[before:]` is empty: returning at `<=` or looping over nothing at `<` does the same",
    # net.http1
    **{
        f"vvault_pep.net.http1.xǁ_Connǁ{name}__mutmut_{n}": "None is as false as False"
        for name, n in (("resume_writing", 1), ("on_message_complete", 1))
    },
    **{
        f"vvault_pep.net.http1.xǁ_Connǁ_fail__mutmut_{n}": "`close()` on the next line marks the"
        " connection closed, and every reader of `dirty` (`_take`, `finish`) refuses a closed one as well"
        for n in (1, 2)
    },
    "vvault_pep.net.http1.xǁ_Connǁclose__mutmut_1": "the transport is set before the connection"
    " object is ever handed out, and aborting an already aborted transport does nothing",
    **{
        f"vvault_pep.net.http1.xǁ_Connǁ_expire__mutmut_{n}": "`_fail` just before always completes the"
        " awaited future (it fails the head, or wakes the waiter): the fallback `set_exception` is never reached"
        for n in (7, 8)
    },
    **{
        f"vvault_pep.net.http1.xǁ_Connǁconnection_lost__mutmut_{n}": "entering the branch for a"
        " connection that is idle (complete) or already failed changes nothing: `_fail` after a complete"
        " answer only closes, which the loss did, and `next_chunk` raises a set error before it looks at"
        " `complete`"
        for n in (4, 5)
    },
    **{
        f"vvault_pep.net.http1.xǁ_Connǁconnection_lost__mutmut_{n}": "`keep_alive` is read only by"
        " `finish`, which never reuses a closed connection, and the loss set `closed` first"
        for n in (13, 14)
    },
    "vvault_pep.net.http1.xǁ_Connǁconnection_lost__mutmut_26": "a writer still waiting for its drain"
    " when the connection is lost is cancelled by `finish`, which every exchange ends with",
    **{
        f"vvault_pep.net.http1.xǁ_Connǁon_header__mutmut_{n}": "codec names are case-insensitive:"
        " 'LATIN-1' is 'latin-1'"
        for n in (4, 7)
    },
    **{
        f"vvault_pep.net.http1.xǁ_Connǁ{name}__mutmut_{n}": "a one-byte shift of a buffer bound: the"
        " bytes per data_received call (what the bound counts) are the kernel's choice, so no upstream can aim"
        " at the byte between `>` and `>=` (the bounds themselves are held by the tests)"
        for name, n in (("on_body", 2), ("on_body", 8), ("next_chunk", 7))
    },
    **{
        f"vvault_pep.net.http1.xǁ_Connǁ{name}__mutmut_{n}": "reading paused after every piece, or"
        " resumed above LOW_WATER: only the pause/resume hysteresis changes; what is buffered stays bounded"
        " by HIGH_WATER plus one read, and resume_reading on a transport that reads is a no-op"
        for name, n in (("on_body", 6), ("on_body", 7), ("next_chunk", 5), ("next_chunk", 6))
    },
    **{
        f"vvault_pep.net.http1.xǁ_Connǁclose__mutmut_{n}": "after `abort()` asyncio runs"
        " connection_lost on the next loop turn, which sets `closed` and forgets the connection; until then"
        " no reader of `closed` runs (the pool's list never holds a connection being closed)"
        for n in (4, 5, 6)
    },
    **{
        f"vvault_pep.net.http1.xǁ_Connǁ{name}__mutmut_{n}": "None is as false as False"
        for name, n in (("on_headers_complete", 13), ("next_chunk", 9))
    },
    "vvault_pep.net.http1.xǁ_Connǁconnection_made__mutmut_2": "`typing.cast` does nothing at run time",
    "vvault_pep.net.http1.xǁ_Connǁdata_received__mutmut_1": "the branch differs only for a connection"
    " that is busy with a complete answer, and there the parser refuses the extra bytes (`_Extra`), which"
    " marks the connection dirty and closes it all the same",
    **{
        f"vvault_pep.net.http1.xǁ_Connǁdata_received__mutmut_{n}": "`close()` on the next line marks"
        " the connection closed, and every reader of `dirty` (`_take`, `finish`) refuses a closed one as well"
        for n in (3, 4)
    },
    **{
        f"vvault_pep.net.http1.xǁ_Connǁ{name}__mutmut_{n}": "a one-byte shift of a buffer bound: the"
        " bytes per data_received call (what the bound counts) are the kernel's choice, so no upstream can aim"
        " at the byte between `>` and `>=` (the bounds themselves are held by the tests)"
        for name, n in (("data_received", 10), ("on_headers_complete", 12))
    },
    "vvault_pep.net.http1.xǁ_Connǁon_status__mutmut_5": "codec names are case-insensitive: 'LATIN-1' is 'latin-1'",
    "vvault_pep.net.http1.xǁ_Connǁon_headers_complete__mutmut_33": "`_head` is set by `start` before"
    " any byte is read and completed only here, once per exchange (an interim answer returns earlier, a"
    " second answer is stopped by `_Extra` first): it is never None and never done at this point",
    **{
        f"vvault_pep.net.http1.xǁ_Connǁ{name}__mutmut_{n}": "an initial value no reader sees:"
        " connection_made sets the transport, `start` sets `busy` and `_head` (with no await between), `put`"
        " sets `idle_since`, the head sets `status` and `until_eof` before anything reads them, the answer's"
        " end sets `keep_alive`; and None is as false as False"
        for name, n in (
            ("__init__", 3),
            ("__init__", 4),
            ("__init__", 6),
            ("__init__", 7),
            ("__init__", 8),
            ("__init__", 9),
            ("_reset", 1),
            ("_reset", 2),
            ("_reset", 6),
            ("_reset", 8),
            ("_reset", 9),
            ("_reset", 10),
            ("_reset", 12),
            ("_reset", 14),
            ("_reset", 15),
            ("_reset", 16),
            ("_reset", 21),
            ("_reset", 23),
            ("_reset", 28),
            ("_reset", 30),
        )
    },
    **{
        f"vvault_pep.net.http1.xǁ_Connǁ_reset__mutmut_{n}": "a one-byte shift of a buffer bound: the"
        " bytes per data_received call (what the bound counts) are the kernel's choice, so no upstream can aim"
        " at the byte between `>` and `>=` (the bounds themselves are held by the tests)"
        for n in (19, 27)
    },
    **{
        f"vvault_pep.net.http1.xǁ_Connǁfinish__mutmut_{n}": "`busy` after `finish`: a connection back"
        " in the pool is complete, so its bytes are refused and its loss ignored either way, and `start` sets"
        " `busy` again before reusing it"
        for n in (20, 21)
    },
    **{
        f"vvault_pep.net.http1.xǁPoolǁ_take__mutmut_{n}": "no connection in the idle list is closed or"
        " dirty: `finish` puts back only clean ones, and closing one (or its loss) takes it off the list at once"
        for n in (3, 4)
    },
    "vvault_pep.net.http1.xǁPoolǁ_take__mutmut_6": "`>` or `>=` on a float clock: no connection can"
    " be taken exactly KEEPALIVE_S after it was put back",
    **{
        f"vvault_pep.net.http1.xǁPoolǁ_head__mutmut_{n}": "the joined text is only searched for CR, LF,"
        " NUL (the probe) or ':' and ' ' (the names): 'XXXX' between the parts adds none of them"
        for n in (7, 10)
    },
    "vvault_pep.net.http1.xǁPoolǁ_head__mutmut_37": "codec names are case-insensitive: 'UTF-8' is 'utf-8'",
    "vvault_pep.net.http1.xǁPoolǁrequest__mutmut_19": "None is as false as False",
    **{
        f"vvault_pep.net.http1.xǁPoolǁ_connect__mutmut_{n}": "a Unix socket's pool has no TLS: its `_ssl` and"
        " `_sni` are None (the URL is http://), which is what dropping or nulling them gives"
        for n in (6, 7, 10)
    },
    "vvault_pep.net.http1.xǁPoolǁrequest__mutmut_67": "a third attempt is never reached: the second"
    " is on a fresh connection, and a fresh connection's failure is raised (`reused` is false)",
    **{
        f"vvault_pep.net.http1.xǁPoolǁrequest__mutmut_{n}": "the line after the loop is unreachable:"
        " every attempt returns or raises, and the second always does"
        for n in (89, 90, 91)
    },
    "vvault_pep.net.http1.xǁ_Connǁ_send__mutmut_8": "chunk sizes are hexadecimal, case-insensitive"
    " (RFC 9112, 7.1: HEXDIG): `1A` and `1a` frame the same chunk for every parser",
    # edge.forward
    "vvault_pep.edge.forward.xǁ_AiohttpAnswerǁchunks__mutmut_1": "aiohttp's client carries HEAD only, whose"
    " answers have no body: the chunk size is never used",
    **{
        f"vvault_pep.edge.forward.xǁUpstreamsǁ_via_aiohttp__mutmut_{n}": "aiohttp raises its own"
        " ServerTimeoutError (a TimeoutError, caught by the branch above) for each deadline it is given;"
        " no other TimeoutError comes out of `session.request`"
        for n in range(34, 42)
    },
    **{
        f"vvault_pep.edge.forward.xǁUpstreamsǁ{name}__mutmut_{n}": "HTTP field names are case-insensitive (RFC"
        " 9110, 5.1): the same header to every client"
        for name, n in (
            ("_answer", 34),
            ("_answer", 35),
            ("_redacted", 48),
            ("_redacted", 49),
            ("_redacted", 52),
            ("_redacted", 53),
            ("_redacted", 59),
            ("_redacted", 60),
            ("forward", 22),
            ("forward", 23),
            ("forward", 29),
            ("forward", 30),
            ("forward", 62),
            ("forward", 63),
        )
    },
    **{
        f"vvault_pep.edge.forward.xǁUpstreamsǁ_redact_body__mutmut_{n}": "both kinds of answer look headers up"
        " case-insensitively (the lean one by `lower()`, aiohttp's in a CIMultiDict)"
        for n in (7, 8, 25, 26)
    },
    "vvault_pep.edge.forward.xǁUpstreamsǁ_redact_body__mutmut_9": "without a Content-Type, 'xxxx' is as far"
    " from JSON as '': the same refusal",
    "vvault_pep.edge.forward.xǁUpstreamsǁ_redact_body__mutmut_12": "without the declared length, the read"
    " (bounded at limit + 1) finds the same answer too large, with the same refusal",
    "vvault_pep.edge.forward.xǁUpstreamsǁ_read__mutmut_3": "`left` comes from the loop clock read after the"
    " budget was made: it is never exactly 0, so `<= 0` and `< 0` never differ",
    "vvault_pep.edge.forward.xǁUpstreamsǁ_read__mutmut_19": "the idle gap and the time left are floats from"
    " config and the loop clock: they are never exactly equal",
    "vvault_pep.edge.forward.xǁUpstreamsǁ_pool__mutmut_5": "for an http:// upstream the initial value stays,"
    " and '' makes the same `None` context as None",
    "vvault_pep.edge.forward.xǁUpstreamsǁ_pool__mutmut_23": "`ssl=True` is asyncio's own"
    " `ssl.create_default_context()`: the same verification as the context made here",
    "vvault_pep.edge.forward.xǁUpstreamsǁ_pool__mutmut_25": "the pool uses its context only for https://"
    " upstreams, which always have one: a context for an http:// upstream is never used",
    **{
        f"vvault_pep.edge.forward.xǁUpstreamsǁ_via_lean__mutmut_{n}": "the headers are a CIMultiDict: lookups are"
        " case-insensitive"
        for n in (6, 7)
    },
    "vvault_pep.edge.forward.xǁUpstreamsǁ_prefix__mutmut_1": "the default is never used: `forward` always"
    " passes what the policy read (b'' when nothing)",
    "vvault_pep.edge.forward.xǁUpstreamsǁ_prefix__mutmut_4": "`[b'']` and `[]` join to the same bytes",
    "vvault_pep.edge.forward.xǁUpstreamsǁ_prefix__mutmut_6": "the budget is fresh here (its count is 0): `=`"
    " and `+=` give the same count",
    **{
        f"vvault_pep.edge.forward.xǁ_AiohttpAnswerǁ{name}__mutmut_{n}": "unreachable: only the redaction reads an"
        " answer's single headers and body, and a redacted HEAD is sent as GET on the lean client, so aiohttp's"
        " answers (HEAD only) are never redacted"
        for name, n in (("header", 1), ("read", 1), ("read", 2), ("read", 3))
    },
    "vvault_pep.edge.forward.xǁUpstreamsǁ_via_aiohttp__mutmut_15": "aiohttp follows a redirect only when"
    " `allow_redirects` is true: None is as false as False",
    "vvault_pep.edge.forward.xǁUpstreamsǁ__init____mutmut_1": "the default is never used: the runtime always"
    " passes `limits.send_idle_timeout_s`",
    "vvault_pep.edge.forward.xǁUpstreamsǁ__init____mutmut_19": "aiohttp's own connection limit is never"
    " reached: the PEP's slots admit at most `max_connections` requests to the upstream at once",
    **{
        f"vvault_pep.edge.forward.xǁUpstreamsǁ__init____mutmut_{n}": "aiohttp's client carries HEAD only, whose"
        " answers have no body: there is nothing to decompress"
        for n in (33, 38)
    },
    **{
        f"vvault_pep.edge.forward.xǁUpstreamsǁ__init____mutmut_{n}": "aiohttp compares the names in"
        " `skip_auto_headers` case-insensitively"
        for n in (51, 52, 54, 55, 57, 58, 60, 61)
    },
    "vvault_pep.edge.forward.xǁUpstreamsǁ__init____mutmut_49": "aiohttp's client carries HEAD only, whose"
    " answers have no body: there is nothing to decompress",
    "vvault_pep.edge.forward.xǁUpstreamsǁ__init____mutmut_44": "`ClientTimeout`'s own default for `total` is"
    " None (aiohttp's 300 s is `DEFAULT_TIMEOUT`, used only for a session given no timeout): the same object",
    "vvault_pep.edge.forward.xǁUpstreamsǁforward__mutmut_1": "the default is never used: the forward stage"
    " always passes the route's or the limits' body deadline",
    "vvault_pep.edge.forward.xǁUpstreamsǁ__init____mutmut_23": "aiohttp's own connection limit is never"
    " reached: the PEP's slots admit at most `max_connections` requests to the upstream at once",
    "vvault_pep.edge.forward.xǁUpstreamsǁ_redact_body__mutmut_32": "an empty Content-Encoding is already"
    " 'identity' (`or 'identity'`): '' never reaches the tuple",
    # decide.cache
    **{
        f"vvault_pep.decide.cache.xǁDecisionCacheǁreconcile__mutmut_{n}": "there is one reply per pair plus the"
        " revision's: `zip` never meets lists of different lengths"
        for n in (90, 93, 95)
    },
    "vvault_pep.decide.cache.xǁDecisionCacheǁ__init____mutmut_67": "the paths are read only once"
    " `use_policy_paths` set them and their revision (`forget_policy_paths` sets {}): while the revision is"
    " None, `policy_paths` returns before reading them",
    "vvault_pep.decide.cache.xǁDecisionCacheǁ__init____mutmut_68": "with no paths set, a paths revision of ''"
    " finds nothing in the empty table, as None does, and `shipped_policy_paths` compares it with a 'b:'"
    " revision only: equal to neither",
    "vvault_pep.decide.cache.x__int__mutmut_2": "`int(None)` raises TypeError, which `_int` answers with 0 as well",
    "vvault_pep.decide.cache.x_without__mutmut_8": "`parent` is always a dict where `.get` is called: the"
    " loop starts at the copied document and moves only to dicts (else it breaks)",
    "vvault_pep.decide.cache.x_without__mutmut_11": "'' is no dict either: the path is left alone, as with None",
    **{
        f"vvault_pep.decide.cache.xǁDecisionCacheǁ_context__mutmut_{n}": "the reply has one value per scope plus"
        " the revision's: `zip` never meets lists of different lengths"
        for n in (12, 15, 17)
    },
    "vvault_pep.decide.cache.xǁDecisionCacheǁ_vary__mutmut_12": "`>` or `>=` on the wall clock against a"
    " float deadline: never equal",
    "vvault_pep.decide.cache.xǁDecisionCacheǁstore__mutmut_68": "the Redis lifetime of an entry living under"
    " 2 ms: 1 ms or 2 ms, gone before any reader could tell",
    "vvault_pep.decide.cache.xǁDecisionCacheǁ_put_l1__mutmut_18": "None is as false as False: the oldest entry"
    " is popped either way",
    **{
        f"vvault_pep.decide.cache.xǁDecisionCacheǁdrain__mutmut_{n}": "the L2 writes never raise (the store"
        " turns every Redis failure into None): there is no exception for `gather` to return or raise"
        for n in (1, 3, 5)
    },
    **{
        f"vvault_pep.decide.cache.xǁDecisionCacheǁ_key__mutmut_{n}": "the entry key is made in this one place"
        " for lookup, store and explain: another tag (or none) changes every key alike, and the index keys"
        " differ in shape and in their Redis kind (the tag of the material's first part alike)"
        for n in (13, 15, 17, 18, 32, 39, 46, 47)
    },
    **{
        f"vvault_pep.decide.cache.xǁDecisionCacheǁ{name}__mutmut_{n}": "`>` or `>=` (`<=` or `<`) between the"
        " wall clock and a float expiry: never equal"
        for name, n in (("lookup", 40), ("lookup", 93), ("_remember_index", 6))
    },
    "vvault_pep.decide.cache.xǁDecisionCacheǁ_key_paths__mutmut_13": "a read of the whole input ('') is"
    " covered by no vary (only '' covers ''), so the coverage test that follows ignores the vary as well",
    **{
        f"vvault_pep.decide.cache.xǁDecisionCacheǁreconcile__mutmut_{n}": "every key written carries the"
        " containment hash tag, so on a Cluster too they are in one slot: the pipeline as a transaction"
        " (MULTI) does the same writes"
        for n in (21, 22)
    },
    **{
        f"vvault_pep.decide.cache.xǁDecisionCacheǁload__mutmut_{n}": "SCAN's COUNT is a hint for the batch"
        " size: the keys found are the same"
        for n in (24, 26, 30)
    },
    **{
        f"vvault_pep.decide.cache.xǁDecisionCacheǁload__mutmut_{n}": "MGET returns one value per key: `zip`"
        " never meets lists of different lengths"
        for n in (40, 43, 44)
    },
    **{
        f"vvault_pep.decide.cache.xǁDecisionCacheǁload__mutmut_{n}": "without its target node, SCAN on a"
        " Cluster goes to every primary (redis-py's default for SCAN): the epoch keys all sit in the"
        " containment slot on one of them, so the keys found are the same"
        for n in (19, 20, 27)
    },
    **{
        f"vvault_pep.decide.cache.xǁDecisionCacheǁ_announce__mutmut_{n}": "Redis command names are"
        " case-insensitive, in a script's redis.call too: 'SPUBLISH' is 'spublish', 'PUBLISH' is 'publish'"
        for n in (7, 9)
    },
    # shared.containment (numbers of the source with the pushed state)
    "vvault_pep.shared.containment.xǁContainmentǁ_write_back__mutmut_5": "None is as false as False: no"
    " transaction either way",
    "vvault_pep.shared.containment.xǁContainmentǁ__init____mutmut_15": "without Redis the channel name is never"
    " used: nothing is published or followed",
    "vvault_pep.shared.containment.xǁContainmentǁ_check__mutmut_17": "`strict=None` is as false as `strict=False`",
    "vvault_pep.shared.containment.xǁContainmentǁ_note_lift__mutmut_15": "the floor of a first lift record's"
    " keep (0.0 or 1.0) differs only for a keep before 1970-01-01T00:00:01, which the next expiry drops either"
    " way; a lift ends entries by its time, never by its keep",
    "vvault_pep.shared.containment.xǁContainmentǁreconcile__mutmut_1": "`lost` is not read: every reconcile is"
    " a full one",
    **{
        f"vvault_pep.shared.containment.xǁContainmentǁreconcile__mutmut_{n}": "a SCAN without MATCH returns more"
        " keys, but only those under the four containment prefixes are kept: the same keys"
        for n in (33, 35)
    },
    **{
        f"vvault_pep.shared.containment.xǁContainmentǁ{name}__mutmut_{n}": "SCAN's COUNT is a hint for the batch"
        " size: the keys found are the same"
        for name, n in (("reconcile", 36), ("reconcile", 39), ("list", 19), ("list", 21), ("list", 25))
    },
    **{
        f"vvault_pep.shared.containment.xǁContainmentǁ{name}__mutmut_{n}": "redis-py answers an MGET of no keys"
        " with [] itself, sending no command: reading no keys changes nothing"
        for name, n in (("reconcile", 54), ("list", 36))
    },
    **{
        f"vvault_pep.shared.containment.xǁContainmentǁ{name}__mutmut_{n}": "MGET returns one value per key: `zip`"
        " never meets lists of different lengths"
        for name, n in (("reconcile", 58), ("reconcile", 61), ("list", 40), ("list", 43), ("list", 45))
    },
    **{
        f"vvault_pep.shared.containment.xǁContainmentǁlist__mutmut_{n}": "list reads only tagged keys, all in"
        " one slot: a SCAN of every primary (redis-py's Cluster default, also when the option is misspelt:"
        " unknown options are not sent) finds the same keys as a SCAN of the slot's owner"
        for n in (9, 11, 12, 22)
    },
    **{
        f"vvault_pep.shared.containment.xǁContainmentǁlist__mutmut_{n}": "every key list reads carries the"
        " containment hash tag, so a plain MGET works on a Cluster too (one slot): the same values either way"
        for n in (28, 33, 34)
    },
}

_STATUS = re.compile(r"^\s*(\S+__mutmut_\d+): (.+)$")
# A mutant that makes the tests fail, time out or crash the interpreter is caught.
CAUGHT = ("killed", "timeout", "segfault")


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


def settled_before(module: str) -> dict[str, str] | None:
    """What the last run of ``module`` settled, if its source is unchanged since (else None).

    Tests are only ever added between runs, so a mutant caught then is caught now, and a
    survivor listed in EQUIVALENT survives still; only the others need running again
    (``--again``).  Read from the last run's summary, so that runs chain: what an earlier
    run settled stays settled.
    """
    work = STAGE / module
    staged, current = work / source(module), ROOT / "proxy" / source(module).removeprefix("src/")
    summary_file = work / "summary.json"
    if not (staged.exists() and summary_file.exists()) or staged.read_bytes() != current.read_bytes():
        return None
    summary = json.loads(summary_file.read_text())
    names = set(results(work, dict(os.environ)))
    survived = set(summary["survived"]) | set(summary["equivalent"])
    open_ = (survived - set(EQUIVALENT)) | set(summary["not_run"])
    return {name: "survived" if name in survived else "killed" for name in names - open_}


def run_module(module: str, budget_s: float, workers: int, again: bool = False) -> dict[str, object]:
    kept = settled_before(module) if again else None
    previous = set(results(STAGE / module, dict(os.environ))) if kept is not None else set()
    if again and kept is None:
        print(f"{module}: no earlier run of this source; running every mutant")
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
    names = sorted(previous - set(kept)) if kept is not None else []
    for attempt in (1, 2):
        if kept is not None and not names:
            status = dict(kept)  # nothing left to run
            break
        try:
            subprocess.run(
                [sys.executable, "-m", "mutmut", "run", "--max-children", str(workers), *names],
                cwd=work,
                env=env,
                timeout=max(budget_s - (time.monotonic() - started), 1),
                check=False,
                stdout=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            timed_out = True
        status = results(work, env)
        status.update(kept or {})  # as the earlier run left them (see settled_before)
        # mutmut stops before any mutant when its clean run fails; a timing test on busy
        # cores can do that once (the first run also compiles the trampolined copy): again.
        if timed_out or attempt == 2 or any(status[n] != "not checked" for n in names or status):
            break
    killed = sum(1 for s in status.values() if s in CAUGHT)
    # A mutant no test reaches is equivalent when EQUIVALENT says why no test can (unreachable code).
    survivors = sorted(n for n, s in status.items() if s == "survived" or (s == "no tests" and n in EQUIVALENT))
    equivalent = [n for n in survivors if n in EQUIVALENT]
    alive = [n for n in survivors if n not in EQUIVALENT]
    unchecked = sorted(n for n, s in status.items() if s not in (*CAUGHT, "survived") and n not in survivors)
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
        "rerun_only": len(names) if kept is not None else None,  # --again: the others were caught before
    }
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help=f"default: all of {', '.join(MODULES)}")
    parser.add_argument("--budget-s", type=float, default=3600, help="overall wall-clock budget (default 1 h)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument(
        "--again",
        action="store_true",
        help="run only the mutants the last run of an unchanged source left open (not caught, not equivalent)",
    )
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
        s = run_module(module, left / (len(modules) - i), args.workers, args.again)
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
