package vvault.blobs_test

import data.vvault.authz

issuer := "CN=vvault demo CA,O=vvault-pep demo"

reader_cert := {"issuer": issuer, "spiffe_id": "spiffe://demo.vvault/client/reader", "common_name": "demo-reader"}

blob(method, tenant, name) := {
	"route": {"name": "blobs", "params": {"tenant": tenant, "name": name}},
	"request": {"method": method, "segments": ["v1", "tenants", tenant, "blobs", name]},
	"time": {"unix_ns": time.parse_rfc3339_ns("2026-11-25T12:00:00Z")},
	"device": {"verified": false, "reason": "absent"},
	"risk": {"available": true, "score": 0, "band": "low"},
	"identity": {"authenticated": false, "kind": "anonymous"},
	"tls": {"client_cert": reader_cert},
}

as_user(i, tenant, roles) := object.union(i, {"identity": {
	"authenticated": true, "kind": "user", "subject": "alice", "issuer": "https://idp.corp.example",
	"tenant": tenant, "roles": roles,
}})

test_client_reads_a_blob_of_its_tenant if {
	d := authz.decision with input as blob("GET", "acme", "report.pdf")
	d.allow == true
	d.reason == "read within an entitled tenant"
	d.upstream_headers["X-Vvault-Data-Class"] == "config"
}

test_head_is_a_read if {
	d := authz.decision with input as blob("HEAD", "acme", "report.pdf")
	d.allow == true
}

test_reader_may_not_write_a_blob if {
	d := authz.decision with input as blob("PUT", "acme", "report.pdf")
	d.allow == false
	d.code == "policy.operation_not_granted"
}

test_writer_writes_a_blob if {
	d := authz.decision with input as as_user(blob("PUT", "acme", "report.pdf"), "acme", ["writer"])
	d.allow == true
	d.reason == "write within an entitled tenant"
}

test_unknown_risk_makes_a_blob_write_read_only if {
	i := object.union(as_user(blob("PUT", "acme", "report.pdf"), "acme", ["writer"]), {"risk": {"available": false, "score": null, "band": "unknown"}})
	d := authz.decision with input as i
	d.allow == false
	d.code == "policy.risk_read_only"
}

test_no_blob_of_another_tenant if {
	d := authz.decision with input as blob("GET", "globex", "report.pdf")
	d.allow == false
	d.code == "policy.tenant_not_entitled"
}

test_other_methods_and_shapes_are_unknown if {
	d1 := authz.decision with input as blob("DELETE", "acme", "report.pdf")
	d1.code == "policy.unknown_operation"
	i := json.patch(blob("GET", "acme", "x"), [{"op": "replace", "path": "/request/segments", "value": ["v1", "tenants", "acme", "blobs"]}])
	d2 := authz.decision with input as i
	d2.code == "policy.unknown_operation"
}
