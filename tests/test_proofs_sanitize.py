"""Path parameters on dot segments: what Tomcat, Jetty and Spring read as ".." is refused.

``/a/..;x/b`` is ``/b`` to a servlet container and ``/a/..;x/b`` to a naive
router: a policy judging one while the upstream serves the other is the
classic path-parameter bypass.  An empty or ``.`` segment with parameters is
the same trick one level down.  A parameter on an ordinary segment is data.
"""

from __future__ import annotations

import pytest

from vvault_pep.config import Sanitize
from vvault_pep.errors import PepError
from vvault_pep.sanitize import canonical_target

RULES = Sanitize()


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
