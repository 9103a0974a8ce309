"""Who is asking: bearer JWTs (:mod:`.jwt`, keys from :mod:`.jwks`), SPIFFE workloads
(:mod:`.workload`), combined per route by :mod:`.authn`; and device posture (:mod:`.posture`)."""
