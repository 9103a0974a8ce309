package vvault.authz

# Field-level least privilege: a caller whose only way to read a secret is the `lister`
# role sees that it exists, never its value.
only_lister if {
	"lister" in effective_roles
	not other_role_reads
}

other_role_reads if {
	some role in effective_roles
	role != "lister"
	role_allows(role, operation)
}

allow_obligations := [{"type": "redact", "fields": ["value"]}] if {
	kind == "secrets"
	operation == "read"
	only_lister
}

else := []
