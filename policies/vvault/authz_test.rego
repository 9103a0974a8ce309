package vvault.authz_test

import data.vvault.authz

reader_cert := {
	"subject": "CN=demo-reader,O=vvault-pep demo",
	"issuer": "CN=vvault demo CA,O=vvault-pep demo",
	"common_name": "demo-reader",
	"spiffe_id": "spiffe://demo.vvault/client/reader",
}

req(method, route, params, cert) := {
	"request": {"method": method, "path": "/x"},
	"route": {"name": route, "params": params},
	"tls": {"client_cert": cert},
}

test_read_in_entitled_tenant_allowed if {
	d := authz.decision with input as req("GET", "secrets", {"tenant": "acme", "path": "db"}, reader_cert)
	d.allow == true
	d.upstream_headers["X-Vvault-Client"] == "spiffe://demo.vvault/client/reader"
}

managed_device := {"verified": true, "managed": true, "id": "dev-1"}

test_collection_query_post_is_a_read if {
	d := authz.decision with input as object.union(
		req("POST", "collection_query", {"tenant": "acme", "collection": "docs"}, reader_cert),
		{"device": managed_device},
	)
	d.allow == true
}

test_collection_query_needs_a_verified_managed_device if {
	base := req("POST", "collection_query", {"tenant": "acme", "collection": "docs"}, reader_cert)
	no_device := authz.decision with input as base
	no_device.code == "policy.device_required"
	unverified := authz.decision with input as object.union(base, {"device": {"verified": false, "reason": "stale"}})
	unverified.allow == false
	unmanaged := authz.decision with input as object.union(base, {"device": {"verified": true, "managed": false}})
	unmanaged.allow == false
}

test_other_tenant_denied if {
	d := authz.decision with input as req("GET", "secrets", {"tenant": "globex", "path": "db"}, reader_cert)
	d.allow == false
	d.status == 403
	d.code == "policy.tenant_not_entitled"
}

test_write_denied if {
	d := authz.decision with input as req("PUT", "secrets", {"tenant": "acme", "path": "db"}, reader_cert)
	d.allow == false
	d.code == "policy.write_denied"
}

test_admin_denied_even_for_reads if {
	d := authz.decision with input as req("GET", "admin", {"path": "tenants"}, reader_cert)
	d.allow == false
	"policy.admin_denied" in d.reasons
}

test_no_certificate_denied if {
	d := authz.decision with input as req("GET", "secrets", {"tenant": "acme", "path": "db"}, null)
	d.allow == false
	d.code == "policy.no_client_cert"
}

test_untrusted_issuer_denied if {
	cert := object.union(reader_cert, {"issuer": "CN=evil CA"})
	d := authz.decision with input as req("GET", "secrets", {"tenant": "acme", "path": "db"}, cert)
	d.allow == false
	"policy.untrusted_issuer" in d.reasons
}

test_unknown_client_denied if {
	cert := object.union(reader_cert, {"spiffe_id": null, "common_name": "nobody"})
	d := authz.decision with input as req("GET", "secrets", {"tenant": "acme", "path": "db"}, cert)
	d.allow == false
	"policy.unknown_client" in d.reasons
}

test_spiffe_id_wins_over_common_name if {
	cert := object.union(reader_cert, {"common_name": "spiffe://demo.vvault/client/ops"})
	d := authz.decision with input as req("GET", "secrets", {"tenant": "globex", "path": "db"}, cert)
	d.allow == false
}

test_empty_input_is_a_deny if {
	d := authz.decision with input as {}
	d.allow == false
}
