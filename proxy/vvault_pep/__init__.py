"""vvault-pep: a zero-trust Policy Enforcement Point in front of vvault APIs.

The few ideas to hold before reading the code:

* **The walk.**  Every request takes the same stages, in the order written once in
  :func:`vvault_pep.app.stages.walk`, one small class each over a typed per-request
  :class:`~vvault_pep.app.exchange.Exchange`: peer (mTLS, the client certificate as
  data) → sanitize (one canonical path and header set, or 400) → route (declarative
  table, 404 on no match) → authenticate (bearer JWTs, SPIFFE workloads) → posture
  (signed device assertions) → name (the verified subject) → body → context (risk,
  containment and cache epochs in one Redis round trip; the versioned ``input`` document)
  → rate limit → decide (L1, Redis L2, OPA with a hard deadline) → obligations → enforce (deny
  unless the answer strictly reads as allow) → forward (streamed, pooled), then audit and
  telemetry.  ``explain`` runs the same list with a forwarder that sends nothing.
* **Packages by role**, importing only downward (``tests/test_layout.py`` checks it):
  ``config`` (models, loader) → ``core`` (pure: request, principal, sanitize, routing,
  policy input, decision, problem) → ``identity``, ``shared`` (Redis state, containment,
  rate limits, risk), ``decide`` (OPA client, decision cache) → ``observe`` (audit,
  sinks, telemetry), ``edge`` (listener, forward, managed OPA) → ``app`` (exchange,
  stages, pipeline, runtime, admin, cli, explain).
* **Deny is the starting value.**  Every fault maps to a stable error code in
  :mod:`vvault_pep.errors`; the code picks the status, the problem+json body
  and the audit record's ``result.code``.
* **Pure in the middle, I/O at the edges.**  Sanitizing, routing, building
  the input and interpreting a decision are pure functions over frozen
  dataclasses; sockets, OPA and upstreams sit behind small classes.
* **Compiled where it pays** (:mod:`vvault_pep.compiled`): mypyc builds the hot pure
  modules of ``core``; the pure ones stay the reference and the fallback.
* **Config is validated once** (:mod:`vvault_pep.config`), into frozen models.
"""

from . import compiled

__version__ = "0.1.0"

# Before any submodule: the hot path's modules load compiled or pure, all together (compiled.py).
compiled.install()
