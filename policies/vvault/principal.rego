package vvault.authz

# A user: a verified bearer token (identity.kind user or user+workload).
is_user if input.identity.kind in {"user", "user+workload"}

# A workload: a SPIFFE ID from a trusted domain (identity stage), or, for PEPs
# without identity config, a client certificate from a trusted CA whose SPIFFE ID
# (else CN) is registered in data.vvault.workloads.
cert := input.tls.client_cert

cert_trusted if cert.issuer in data.vvault.trusted_issuers

cert_id := cert.spiffe_id if {
	is_string(cert.spiffe_id)
} else := cert.common_name

workload_id := input.identity.workload.spiffe_id if {
	not is_user
	is_string(input.identity.workload.spiffe_id)
} else := cert_id if {
	not is_user
	cert_trusted
}

workload := data.vvault.workloads[workload_id]

principal_id := input.identity.subject if is_user

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
