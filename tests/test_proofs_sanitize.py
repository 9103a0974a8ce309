"""Path parameters on dot segments: what Tomcat, Jetty and Spring read as ".." is refused.

``/a/..;x/b`` is ``/b`` to a servlet container and ``/a/..;x/b`` to a naive
router: a policy judging one while the upstream serves the other is the
classic path-parameter bypass.  An empty or ``.`` segment with parameters is
the same trick one level down.  A parameter on an ordinary segment is data —
where a config accepts ``;`` at all: by default every ``;`` is refused.
"""

from __future__ import annotations

import pytest

from vvault_pep.config import Sanitize
from vvault_pep.core.sanitize import canonical_target
from vvault_pep.errors import PepError

# The dot-segment rule matters where ';' is accepted (by default it is refused outright).
RULES = Sanitize(reject_semicolon=False)


@pytest.mark.parametrize(
    "raw",
    ["/v1/..;x/admin", "/v1/..;/admin", "/v1/.;x/secrets", "/v1/;x/secrets", "/v1/;/secrets", "/..;jsessionid=1/a"],
)
def test_dot_segments_with_parameters_are_refused(raw: str) -> None:
    with pytest.raises(PepError) as err:
        canonical_target(raw, RULES)
    assert (err.value.code, err.value.status) == ("sanitize.ambiguous_path", 400)


def test_a_parameter_on_an_ordinary_segment_is_kept() -> None:
    target = canonical_target("/v1/a;x/b", RULES)
    assert (target.path, target.segments) == ("/v1/a;x/b", ("v1", "a;x", "b"))


def test_by_default_every_path_parameter_is_refused() -> None:
    with pytest.raises(PepError) as err:
        canonical_target("/v1/a;x/b", Sanitize())
    assert (err.value.code, err.value.status) == ("sanitize.ambiguous_path", 400)
