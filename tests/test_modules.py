"""decide/modules.py: OPA's module listing read for the revision hash, its AST skipped."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vvault_pep.decide import modules
from vvault_pep.errors import PepError

FAST = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
MODULE = st.fixed_dictionaries({"id": st.text(), "raw": st.text()}, optional={"ast": JSON, "extra": JSON})


@FAST
@given(st.lists(MODULE, max_size=6))
def test_a_listing_gives_what_a_whole_decode_gives(listing: list[dict[str, Any]]) -> None:
    raw = orjson.dumps({"result": listing})
    whole = orjson.loads(raw)["result"]
    assert modules.sources(raw) == sorted((m["id"], m["raw"]) for m in whole)


def _is_listing(doc: Any) -> bool:
    result = doc.get("result", []) if isinstance(doc, dict) else None
    return isinstance(result, list) and all(
        isinstance(m, dict) and isinstance(m.get("id"), str) and isinstance(m.get("raw"), str) for m in result
    )


@FAST
@given(JSON | st.fixed_dictionaries({"result": st.lists(MODULE | JSON, max_size=4)}))
def test_anything_else_is_refused_with_its_code(doc: Any) -> None:
    raw = orjson.dumps(doc)
    if _is_listing(doc):
        assert modules.sources(raw) == sorted((m["id"], m["raw"]) for m in doc.get("result", []))
    else:
        with pytest.raises(PepError) as err:
            modules.sources(raw)
        assert err.value.code == "pdp.error"


@FAST
@given(st.binary(max_size=64))
def test_bytes_that_are_not_json_are_refused(raw: bytes) -> None:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        with pytest.raises(PepError) as err:
            modules.sources(raw)
        assert err.value.code == "pdp.error"


def test_no_listing_names_no_modules() -> None:
    assert modules.sources(b"{}") == []
    assert modules.sources(b'{"result": []}') == []


def test_a_listing_nested_past_the_decoder_depth_is_refused_with_its_code() -> None:
    # Inside the skipped AST too: an uncaught RecursionError would end the revision task for good.
    deep = b'{"result": [{"id": "a.rego", "raw": "package a", "ast": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    with pytest.raises(PepError) as err:
        modules.sources(deep)
    assert (err.value.code, err.value.detail) == (
        "pdp.error",
        "GET /v1/policies: not a module listing (nested too deep)",
    )
