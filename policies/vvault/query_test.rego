package vvault.query_test

import data.vvault.authz

indexer := "spiffe://prod.vvault/ns/platform/sa/indexer"

query(body, truncated) := {
	"route": {"name": "collection_query", "params": {"tenant": "acme", "collection": "docs"}},
	"request": {
		"method": "POST",
		"segments": ["v1", "tenants", "acme", "collections", "docs", "query"],
		"body": body,
		"body_truncated": truncated,
	},
	"time": {"unix_ns": 0},
	"device": {"verified": false, "reason": "absent"},
	"risk": {"available": false, "score": null, "band": "unknown"},
	"tls": {"client_cert": null},
	"identity": {
		"authenticated": true, "kind": "workload", "subject": indexer,
		"workload": {"spiffe_id": indexer, "trust_domain": "prod.vvault", "path": "/x"},
	},
}

reasons(body, truncated) := {r | some r in authz.deny with input as query(body, truncated)}

test_bounded_query_allowed if {
	d := authz.decision with input as query({"vector": [0.1, 0.2], "top_k": 10, "filter": {"tag": "faq"}}, false)
	d.allow
}

test_top_k_too_large_denied if "policy.query_top_k" in reasons({"vector": [0.1], "top_k": 5000}, false)

test_top_k_missing_or_not_integer_denied if {
	"policy.query_top_k" in reasons({"vector": [0.1]}, false)
	"policy.query_top_k" in reasons({"vector": [0.1], "top_k": 2.5}, false)
	"policy.query_top_k" in reasons({"vector": [0.1], "top_k": "10"}, false)
}

test_filter_on_unlisted_field_denied if {
	"policy.query_filter" in reasons({"top_k": 5, "filter": {"tenant": "globex"}}, false)
	"policy.query_filter" in reasons({"top_k": 5, "filter": "tag == faq"}, false)
}

test_truncated_body_denied if "policy.query_too_large" in reasons(null, true)

test_missing_body_denied if "policy.query_body_required" in reasons(null, false)

test_route_without_inspection_not_judged_here if {
	r := json.remove(query(null, false), ["request/body", "request/body_truncated"])
	d := authz.decision with input as r
	d.allow
}
