package vvault.authz_test

import data.vvault.authz

# ------------------------------------------------------------------ fixtures

now := time.parse_rfc3339_ns("2026-11-25T12:00:00Z")

now_s := now / 1000000000

issuer := "CN=vvault demo CA,O=vvault-pep demo"

corp := "https://idp.corp.example"

reader_cert := {"issuer": issuer, "spiffe_id": "spiffe://demo.vvault/client/reader", "common_name": "demo-reader"}

ops_cert := {"issuer": issuer, "spiffe_id": "spiffe://demo.vvault/client/ops", "common_name": "demo-ops"}

indexer := "spiffe://prod.vvault/ns/platform/sa/indexer"

good_device := {
	"verified": true, "managed": true, "disk_encrypted": true, "patch_age_days": 3,
	"id": "dev-1",
}

segments_for("secrets", p) := array.concat(["v1", "tenants", p.tenant, "secrets"], split(p.path, "/"))

segments_for("rotations", p) := array.concat(["v1", "tenants", p.tenant, "rotations"], split(p.path, "/"))

segments_for("collections", p) := ["v1", "tenants", p.tenant, "collections"]

segments_for("collection_query", p) := ["v1", "tenants", p.tenant, "collections", p.collection, "query"]

segments_for("collection_vectors", p) := ["v1", "tenants", p.tenant, "collections", p.collection, "vectors"]

segments_for("admin", p) := ["v1", "admin", p.path]

segments_for("elsewhere", _) := ["v1", "elsewhere"]

req(route, method, params) := {
	"route": {"name": route, "params": params},
	"request": {"method": method, "segments": segments_for(route, params)},
	"time": {"unix_ns": now},
	"device": {"verified": false, "reason": "absent"},
	"risk": {"available": true, "score": 0, "band": "low"},
	"identity": {"authenticated": false, "kind": "anonymous"},
	"tls": {"client_cert": null},
}

# a user in tenant `tenant` with `roles`, signed in a minute ago with MFA
as_user(r, sub, tenant, roles) := object.union(r, {"identity": {
	"authenticated": true, "kind": "user", "subject": sub, "issuer": corp, "tenant": tenant, "roles": roles,
	"amr": ["pwd", "mfa"], "auth_time": now_s - 60,
}})

as_cert(r, c) := object.union(r, {"tls": {"client_cert": c}})

as_workload(r, spiffe) := object.union(r, {"identity": {
	"authenticated": true, "kind": "workload", "subject": spiffe,
	"workload": {"spiffe_id": spiffe, "trust_domain": "prod.vvault", "path": "/x"},
}})

with_device(r, d) := object.union(r, {"device": d})

secret(tenant, path) := req("secrets", "GET", {"tenant": tenant, "path": path})

allowed(i) if authz.decision.allow == true with input as i

denied(i, code) if {
	d := authz.decision with input as i
	d.allow == false
	code in d.reasons
}

grant(ticket, sub, role, tenant, not_after) := {ticket: {
	"subject": sub, "issuer": corp, "role": role, "tenant": tenant, "not_after": not_after, "ticket": ticket,
}}

# ------------------------------------------------------------------ registered clients (certificates)

test_registered_client_reads_its_tenant if {
	allowed(as_cert(secret("acme", "db-password"), reader_cert))
	d := authz.decision with input as as_cert(secret("acme", "db-password"), reader_cert)
	d.upstream_headers["X-Vvault-Client"] == "spiffe://demo.vvault/client/reader"
	d.upstream_headers["X-Vvault-Data-Class"] == "config"
	d.reason == "read within an entitled tenant"
}

test_no_certificate if denied(secret("acme", "x"), "policy.no_client_cert")

test_untrusted_issuer if denied(as_cert(secret("acme", "x"), object.union(reader_cert, {"issuer": "CN=evil"})), "policy.untrusted_issuer")

test_unknown_client if denied(as_cert(secret("acme", "x"), object.union(reader_cert, {"spiffe_id": null, "common_name": "nobody"})), "policy.unknown_client")

test_client_other_tenant if denied(as_cert(secret("globex", "x"), reader_cert), "policy.tenant_not_entitled")

test_client_write_not_granted if denied(as_cert(req("secrets", "PUT", {"tenant": "acme", "path": "x"}), reader_cert), "policy.operation_not_granted")

test_client_never_admin if denied(as_cert(req("admin", "GET", {"path": "tenants"}), reader_cert), "policy.admin_denied")

test_unknown_route if denied(as_cert(req("elsewhere", "GET", {"tenant": "acme"}), reader_cert), "policy.unknown_operation")

test_empty_input_is_a_deny if {
	d := authz.decision with input as {}
	d.allow == false
}

# ------------------------------------------------------------------ tenant isolation

test_user_reads_own_tenant if allowed(as_user(secret("acme", "app/config"), "alice", "acme", ["reader"]))

test_user_cross_tenant_denied if denied(as_user(secret("globex", "app/config"), "alice", "acme", ["reader"]), "policy.tenant_not_entitled")

test_role_alone_never_crosses_tenants if denied(as_user(secret("globex", "app/config"), "root", "acme", ["vvault-admin"]), "policy.tenant_not_entitled")

test_workload_without_grant_denied if denied(as_workload(req("collection_query", "POST", {"tenant": "globex", "collection": "docs"}), indexer), "policy.tenant_not_entitled")

test_workload_with_grant_allowed if allowed(as_workload(req("collection_query", "POST", {"tenant": "acme", "collection": "docs"}), indexer))

test_workload_grant_is_per_path if denied(as_workload(req("collection_query", "POST", {"tenant": "acme", "collection": "customers"}), indexer), "policy.tenant_not_entitled")

test_workload_grant_is_per_operation if denied(as_workload(req("collection_vectors", "POST", {"tenant": "acme", "collection": "docs"}), indexer), "policy.operation_not_granted")

# ------------------------------------------------------------------ data classes and least privilege

test_class_resolution if {
	classes := {
		"pii/ssn": "pii", "tokens/api": "tokens", "db-password": "config", "logs/x": "logs",
		"public/readme": "public", "app/config": "config",
	}
	every path, class in classes {
		d := authz.decision with input as as_user(with_device(secret("acme", path), good_device), "a", "acme", ["vvault-admin"])
		d.upstream_headers["X-Vvault-Data-Class"] == class
	}
}

test_collection_classes if {
	d := authz.decision with input as as_user(req("collection_query", "POST", {"tenant": "acme", "collection": "audit"}), "a", "acme", ["reader"])
	d.upstream_headers["X-Vvault-Data-Class"] == "logs"
}

test_reader_cannot_write if denied(as_user(req("secrets", "PUT", {"tenant": "acme", "path": "app/x"}), "a", "acme", ["reader"]), "policy.operation_not_granted")

test_writer_can_write_config if allowed(as_user(req("secrets", "PUT", {"tenant": "acme", "path": "app/x"}), "a", "acme", ["writer"]))

test_writer_cannot_delete_logs if denied(as_user(req("secrets", "DELETE", {"tenant": "acme", "path": "logs/x"}), "a", "acme", ["writer"]), "policy.operation_not_granted")

test_reader_cannot_read_pii if denied(as_user(with_device(secret("acme", "pii/ssn"), good_device), "a", "acme", ["reader"]), "policy.operation_not_granted")

# ------------------------------------------------------------------ device posture per class

test_pii_from_compliant_device if allowed(as_user(with_device(secret("acme", "pii/ssn"), good_device), "a", "acme", ["pii-analyst"]))

test_pii_without_device if denied(as_user(secret("acme", "pii/ssn"), "a", "acme", ["pii-analyst"]), "policy.device_required")

test_pii_from_unmanaged_device if denied(as_user(with_device(secret("acme", "pii/ssn"), object.union(good_device, {"managed": false})), "a", "acme", ["pii-analyst"]), "policy.device_required")

test_pii_from_unencrypted_device if denied(as_user(with_device(secret("acme", "pii/ssn"), object.union(good_device, {"disk_encrypted": false})), "a", "acme", ["pii-analyst"]), "policy.device_required")

test_pii_from_unpatched_device if denied(as_user(with_device(secret("acme", "pii/ssn"), object.union(good_device, {"patch_age_days": 90})), "a", "acme", ["pii-analyst"]), "policy.device_required")

test_public_needs_no_device if allowed(as_user(secret("acme", "public/readme"), "a", "acme", ["reader"]))

# ------------------------------------------------------------------ control plane and JIT

rotation := req("rotations", "POST", {"tenant": "acme", "path": "tokens/api"})

test_rotation_without_mfa if denied(object.union(as_user(with_device(rotation, good_device), "kim", "acme", ["key-admin"]), {"identity": {"amr": ["pwd"]}}), "policy.mfa_required")

test_rotation_with_stale_auth if denied(object.union(as_user(with_device(rotation, good_device), "kim", "acme", ["key-admin"]), {"identity": {"auth_time": now_s - 3600}}), "policy.auth_too_old")

test_rotation_needs_elevation if denied(as_user(with_device(rotation, good_device), "kim", "acme", ["key-admin"]), "policy.elevation_required")

test_rotation_with_live_jit_grant if {
	allowed(as_user(with_device(rotation, good_device), "kim", "acme", [])) with data.vvault.grants as grant("CHG-1", "kim", "key-admin", "acme", "2026-11-25T13:00:00Z")
	d := authz.decision with input as as_user(with_device(rotation, good_device), "kim", "acme", []) with data.vvault.grants as grant("CHG-1", "kim", "key-admin", "acme", "2026-11-25T13:00:00Z")
	d.cache.no_store == true
}

test_rotation_after_grant_expired if denied(as_user(with_device(rotation, good_device), "kim", "acme", []), "policy.elevation_required") with data.vvault.grants as grant("CHG-1", "kim", "key-admin", "acme", "2026-11-25T11:59:59Z")

test_jit_grant_is_for_its_subject_only if denied(as_user(with_device(rotation, good_device), "eve", "acme", []), "policy.elevation_required") with data.vvault.grants as grant("CHG-1", "kim", "key-admin", "acme", "2026-11-25T13:00:00Z")

test_standing_admin_may_rotate if allowed(as_user(with_device(rotation, good_device), "root", "acme", ["vvault-admin"]))

test_grant_role_lacks_operation_is_no_elevation if denied(as_user(with_device(req("rotations", "POST", {"tenant": "acme", "path": "public/x"}), good_device), "kim", "acme", []), "policy.elevation_required") with data.vvault.grants as grant("CHG-1", "kim", "key-admin", "acme", "2026-11-25T13:00:00Z")

test_app_admin_area_for_standing_admins if allowed(as_user(req("admin", "GET", {"path": "tenants"}), "root", "acme", ["vvault-admin"]))

# ------------------------------------------------------------------ risk gating

risky(i, score) := object.union(i, {"risk": {"available": true, "score": score, "band": "x"}})

test_medium_risk_reads_only if {
	allowed(risky(as_user(secret("acme", "app/x"), "a", "acme", ["writer"]), 60))
	denied(risky(as_user(req("secrets", "PUT", {"tenant": "acme", "path": "app/x"}), "a", "acme", ["writer"]), 60), "policy.risk_read_only")
}

test_high_risk_quarantines if {
	d := authz.decision with input as risky(as_user(secret("acme", "app/x"), "a", "acme", ["reader"]), 90)
	d.allow == false
	"policy.risk_quarantine" in d.reasons
	d.obligations[0].type == "quarantine"
	d.obligations[0].scope == "subject"
}

test_unavailable_risk_does_not_block_reads if allowed(object.union(as_user(secret("acme", "app/x"), "a", "acme", ["reader"]), {"risk": {"available": false}}))

unknown_risk(i) := object.union(i, {"risk": {"available": false, "score": null, "band": "unknown"}})

test_unknown_risk_is_not_low_for_writes if denied(unknown_risk(as_user(req("secrets", "PUT", {"tenant": "acme", "path": "app/x"}), "a", "acme", ["writer"])), "policy.risk_read_only")

test_unknown_risk_is_not_low_for_rotations if denied(unknown_risk(as_user(with_device(rotation, good_device), "root", "acme", ["vvault-admin"])), "policy.risk_read_only")

test_unknown_risk_is_not_low_for_the_admin_area if denied(unknown_risk(as_user(req("admin", "GET", {"path": "tenants"}), "root", "acme", ["vvault-admin"])), "policy.risk_read_only")

test_unavailable_band_is_data if allowed(unknown_risk(as_user(req("secrets", "PUT", {"tenant": "acme", "path": "app/x"}), "a", "acme", ["writer"]))) with data.vvault.risk.unavailable_band as "none"

test_available_risk_without_a_score_is_unknown if denied(json.remove(as_user(req("secrets", "PUT", {"tenant": "acme", "path": "app/x"}), "a", "acme", ["writer"]), ["risk/score"]), "policy.risk_read_only")

test_available_risk_with_a_mistyped_score_is_unknown if denied(object.union(as_user(req("secrets", "PUT", {"tenant": "acme", "path": "app/x"}), "a", "acme", ["writer"]), {"risk": {"available": true, "score": "low"}}), "policy.risk_read_only")

# ------------------------------------------------------------------ field-level least privilege

test_lister_gets_values_redacted if {
	d := authz.decision with input as as_user(secret("acme", "app/x"), "l", "acme", ["lister"])
	d.allow == true
	d.obligations == [{"type": "redact", "fields": ["value"]}]
}

test_lister_with_a_reading_role_sees_values if {
	d := authz.decision with input as as_user(secret("acme", "app/x"), "l", "acme", ["lister", "reader"])
	d.obligations == []
}

# ------------------------------------------------------------------ grants mean what they say

collection(tenant, name) := req("collection_query", "POST", {"tenant": tenant, "collection": name})

test_workload_grant_stops_at_a_segment_boundary if denied(as_workload(collection("acme", "docs-hr"), indexer), "policy.tenant_not_entitled")

test_workload_grant_is_for_its_kind if denied(as_workload(secret("acme", "docs-signing-key"), indexer), "policy.tenant_not_entitled")

test_workload_grant_of_a_collection_is_not_the_secret_of_that_name if denied(as_workload(secret("acme", "docs"), indexer), "policy.tenant_not_entitled")

test_workload_secret_grant_covers_paths_below if allowed(as_cert(secret("initech", "public/readme"), ops_cert))

test_workload_secret_grant_stops_at_a_segment_boundary if denied(as_cert(secret("initech", "public-keys/x"), ops_cert), "policy.tenant_not_entitled")

test_workload_grant_without_kind_grants_nothing if {
	denied(as_workload(collection("acme", "docs"), indexer), "policy.tenant_not_entitled") with data.vvault.workloads as {indexer: {"tenants": [], "ops": [], "grants": [{"tenant": "acme", "paths": ["docs"], "ops": ["read", "query"]}]}}
}

test_jit_grant_is_for_its_issuer_only if {
	i := object.union(as_user(with_device(rotation, good_device), "kim", "acme", []), {"identity": {"issuer": "https://other.example"}})
	denied(i, "policy.elevation_required") with data.vvault.grants as grant("CHG-1", "kim", "key-admin", "acme", "2026-11-25T13:00:00Z")
}

test_jit_grant_without_issuer_is_ignored if {
	g := {"CHG-1": {"subject": "kim", "role": "key-admin", "tenant": "acme", "not_after": "2026-11-25T13:00:00Z"}}
	denied(as_user(with_device(rotation, good_device), "kim", "acme", []), "policy.elevation_required") with data.vvault.grants as g
}

test_read_only_grant_does_not_elevate_a_key_admin if {
	denied(as_user(with_device(rotation, good_device), "kim", "acme", ["key-admin"]), "policy.elevation_required") with data.vvault.grants as grant("CHG-1", "kim", "reader", "acme", "2026-11-25T13:00:00Z")
}

test_jit_grant_of_an_unknown_role_is_ignored if {
	denied(as_user(secret("globex", "app/x"), "kim", "acme", []), "policy.tenant_not_entitled") with data.vvault.grants as grant("CHG-1", "kim", "no-such-role", "globex", "2026-11-25T13:00:00Z")
}

test_jit_grant_reaches_another_tenant_for_its_role if {
	allowed(as_user(secret("globex", "app/x"), "kim", "acme", [])) with data.vvault.grants as grant("CHG-1", "kim", "reader", "globex", "2026-11-25T13:00:00Z")
}

# ------------------------------------------------------------------ identity namespaces

test_cn_never_spells_a_spiffe_id if {
	c := {"issuer": issuer, "spiffe_id": null, "uri_sans": [], "common_name": "spiffe://demo.vvault/client/ops", "subject": "CN=spiffe://demo.vvault/client/ops"}
	denied(as_cert(secret("globex", "x"), c), "policy.unknown_client")
}

test_an_svid_has_exactly_one_uri_san if {
	c := object.union(ops_cert, {"uri_sans": ["spiffe://demo.vvault/client/ops", "https://elsewhere"]})
	denied(as_cert(secret("globex", "x"), c), "policy.unknown_client")
}

test_spiffe_id_must_be_the_uri_san if {
	c := object.union(ops_cert, {"uri_sans": []})
	denied(as_cert(secret("globex", "x"), c), "policy.unknown_client")
}

test_non_spiffe_clients_have_their_own_namespace if {
	c := {"issuer": issuer, "spiffe_id": null, "uri_sans": [], "common_name": "legacy", "subject": "CN=legacy"}
	allowed(as_cert(secret("acme", "x"), c)) with data.vvault.workloads as {"x509:CN=legacy": {"tenants": ["acme"], "ops": ["read"]}}
}

test_user_without_issuer_is_nobody if {
	i := json.remove(as_user(secret("acme", "app/config"), "alice", "acme", ["reader"]), ["identity/issuer"])
	denied(i, "policy.unknown_client")
}

test_user_with_a_mistyped_subject_is_nobody if {
	i := object.union(as_user(secret("acme", "app/config"), "alice", "acme", ["reader"]), {"identity": {"subject": 7}})
	denied(i, "policy.unknown_client")
}

# ------------------------------------------------------------------ recency and redaction

test_future_auth_time_is_not_recent if denied(object.union(as_user(with_device(rotation, good_device), "root", "acme", ["vvault-admin"]), {"identity": {"auth_time": now_s + 3600}}), "policy.auth_too_old")

test_auth_time_within_clock_skew_is_recent if allowed(object.union(as_user(with_device(rotation, good_device), "root", "acme", ["vvault-admin"]), {"identity": {"auth_time": now_s + 10}}))

test_lister_reads_pii_collections_redacted if {
	i := as_user(req("collections", "GET", {"tenant": "acme"}), "l", "acme", ["lister"])
	j := object.union(i, {"request": {"segments": ["v1", "tenants", "acme", "collections", "customers"]}})
	d := authz.decision with input as with_device(j, good_device)
	d.allow == true
	d.upstream_headers["X-Vvault-Data-Class"] == "pii"
	d.obligations[0].type == "redact"
	"metadata" in d.obligations[0].fields
}

# ------------------------------------------------------------------ cache lifetimes end where the clock matters

test_an_answer_resting_on_a_grant_ends_with_it if {
	d := authz.decision with input as as_user(secret("globex", "app/x"), "kim", "acme", []) with data.vvault.grants as grant("CHG-1", "kim", "reader", "globex", "2026-11-25T12:00:10Z")
	d.allow == true
	d.cache.ttl_s == 9
}

test_an_answer_without_grants_keeps_the_default_ttl if {
	d := authz.decision with input as as_user(secret("acme", "app/x"), "a", "acme", ["reader"])
	d.cache.ttl_s == 30
}

test_a_malformed_workload_id_never_falls_back_to_the_certificate if {
	i := object.union(as_cert(secret("acme", "x"), reader_cert), {"identity": {"authenticated": true, "kind": "workload", "workload": {"spiffe_id": 7}}})
	denied(i, "policy.unknown_client")
}

test_an_unregistered_workload_is_unknown if denied(as_workload(secret("acme", "x"), "spiffe://prod.vvault/ns/x/sa/nobody"), "policy.unknown_client")
