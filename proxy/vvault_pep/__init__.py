"""vvault-pep: a zero-trust Policy Enforcement Point in front of vvault APIs.

The few ideas to hold before reading the code:

* **The walk.**  Every request takes the same stages, one module each, in the
  order written once in :meth:`vvault_pep.pipeline.Pipeline._walk`:
  ``listener`` (mTLS, the client certificate as data) → ``sanitize`` (one
  canonical path and header set, or 400) → ``routing`` (declarative table,
  404 on no match) → ``authn`` (bearer JWTs, SPIFFE workloads) → ``posture``
  (signed device assertions) → ``risk`` (shared per-subject signals) →
  ``policy_input`` (the versioned ``input`` document) → ``containment`` and
  ``ratelimit`` (quarantines, revocations, limits) → ``cache`` (L1, Redis L2)
  → ``pdp`` (OPA over REST, hard deadline) → ``enforce`` (deny unless the
  answer strictly reads as allow) → ``forward`` (streamed, pooled) →
  ``audit`` and ``telemetry``.
* **Deny is the starting value.**  Every fault maps to a stable error code in
  :mod:`vvault_pep.errors`; the code picks the status, the problem+json body
  and the audit record's ``result.code``.
* **Pure in the middle, I/O at the edges.**  Sanitizing, routing, building
  the input and interpreting a decision are pure functions over frozen
  dataclasses; sockets, OPA and upstreams sit behind small classes.
* **Config is validated once** (:mod:`vvault_pep.config`), into frozen models.
"""

__version__ = "0.1.0"
