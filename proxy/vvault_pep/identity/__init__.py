"""Who is asking: bearer JWTs (with their key sets), SPIFFE workloads and device posture."""
