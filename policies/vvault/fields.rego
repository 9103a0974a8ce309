package vvault.authz

# Field-level least privilege: a caller whose only way to read something is the `lister`
# role sees that it exists, never its content — for every kind a lister can read:
# secrets (their value) and collections (their vectors, documents and metadata).
only_lister if {
	"lister" in effective_roles
	not other_role_reads
}

other_role_reads if {
	some role in effective_roles
	role != "lister"
	role_allows(role, operation)
}

redacted_fields := {
	"secrets": ["value"],
	"collections": ["value", "vector", "vectors", "metadata", "text"],
}

allow_obligations := [{"type": "redact", "fields": redacted_fields[kind]}] if {
	operation in {"read", "query"}
	only_lister
}

else := []
