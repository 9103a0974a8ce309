package vvault.authz

# A user: a verified bearer token (identity.kind user or user+workload).
is_user if input.identity.kind in {"user", "user+workload"}

# A workload: a SPIFFE ID the identity stage validated (a trusted domain, exactly one
# URI SAN), or, for PEPs without identity config, a client certificate from a trusted
# CA, named by its URI SAN SPIFFE ID.  A certificate without one is a non-SPIFFE client
# and lives in its own namespace ("x509:" + its subject DN): its CN never stands in for
# a SPIFFE ID, so `CN=spiffe://…/ops` is not the ops workload.
cert := input.tls.client_cert

cert_trusted if cert.issuer in data.vvault.trusted_issuers

cert_spiffe := cert.spiffe_id if {
	is_string(cert.spiffe_id)
	startswith(cert.spiffe_id, "spiffe://")
	object.get(cert, "uri_sans", [cert.spiffe_id]) == [cert.spiffe_id] # an X.509-SVID has exactly one URI SAN
}

cert_id := cert_spiffe if is_string(cert_spiffe)

else := concat("", ["x509:", cert.subject]) if is_string(cert.subject)

workload_id := input.identity.workload.spiffe_id if {
	not is_user
	is_string(input.identity.workload.spiffe_id)
} else := cert_id if {
	not is_user
	not input.identity.workload # the identity stage named none: a malformed one is no licence to fall back
	cert_trusted
}

workload := data.vvault.workloads[workload_id]

principal_id := input.identity.subject if {
	is_user
	user_named
}

else := workload_id if workload

deny contains "policy.no_client_cert" if {
	not is_user
	not input.identity.workload
	not is_object(cert)
}

deny contains "policy.untrusted_issuer" if {
	not is_user
	is_object(cert)
	not cert_trusted
}

deny contains "policy.unknown_client" if {
	not is_user
	cert_trusted
	not workload
}

# A workload the identity stage named that is not registered, or not a string.
deny contains "policy.unknown_client" if {
	not is_user
	input.identity.workload
	not workload
}

# A user whose token names no subject or issuer is nobody the policy can reason about.
# (A rule, not `not is_string(…)` inline: a builtin over an undefined ref is undefined
# and its negation would never hold.)
user_named if {
	is_string(input.identity.subject)
	is_string(input.identity.issuer)
}

deny contains "policy.unknown_client" if {
	is_user
	not user_named
}
