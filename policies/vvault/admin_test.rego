package vvault.admin_test

import data.vvault.admin

cert(spiffe) := {"issuer": "CN=vvault demo CA,O=vvault-pep demo", "spiffe_id": spiffe, "uri_sans": [spiffe], "common_name": "x", "subject": "CN=x"}

ops := cert("spiffe://demo.vvault/client/ops")

now := time.parse_rfc3339_ns("2026-11-25T12:00:00Z")

at(i) := object.union(i, {"time": {"unix_ns": now}})

kim_grant(not_after) := {"subject": "kim", "issuer": "https://idp", "role": "key-admin", "tenant": "acme", "not_after": not_after, "ticket": "CHG-1"}

grant_add(body) := at({"admin": {"action": "grant.add", "body": body}, "tls": {"client_cert": ops}})

push(path, body) := at({"admin": {"action": "opa.data.put", "data_path": path, "body": body}, "tls": {"client_cert": ops}})

mfa_admin := {"kind": "user", "subject": "pat", "issuer": "https://idp", "amr": ["pwd", "mfa"], "auth_time": (now / 1000000000) - 60, "cert_bound": true}

policy_admins := {"spiffe://demo.vvault/client/ops": ["*", "policy-admin"]}

allowed(i) if {
	d := admin.decision with input as i
	d.allow == true
}

refused(i) if {
	d := admin.decision with input as i
	d.allow == false
}

test_ops_may_quarantine if {
	d := admin.decision with input as {
		"admin": {"action": "quarantine.add"},
		"tls": {"client_cert": cert("spiffe://demo.vvault/client/ops")},
	}
	d.allow == true
}

test_reader_may_not if {
	d := admin.decision with input as {
		"admin": {"action": "quarantine.add"},
		"tls": {"client_cert": cert("spiffe://demo.vvault/client/reader")},
	}
	d.allow == false
}

test_untrusted_issuer_may_not if {
	c := object.union(cert("spiffe://demo.vvault/client/ops"), {"issuer": "CN=other"})
	d := admin.decision with input as {"admin": {"action": "cache.read"}, "tls": {"client_cert": c}}
	d.allow == false
}

test_ops_may_grant_a_grantable_role if allowed(grant_add(kim_grant("2026-11-25T18:00:00Z")))

test_no_grant_beyond_its_longest_duration if refused(grant_add(kim_grant("2096-11-25T18:00:00Z")))

test_no_grant_in_the_past if refused(grant_add(kim_grant("2026-11-25T11:00:00Z")))

test_no_grant_without_issuer if refused(grant_add(json.remove(kim_grant("2026-11-25T18:00:00Z"), ["issuer"])))

test_cn_never_spells_an_admin if {
	c := {"issuer": "CN=vvault demo CA,O=vvault-pep demo", "spiffe_id": null, "uri_sans": [], "common_name": "spiffe://demo.vvault/client/ops", "subject": "CN=spiffe://demo.vvault/client/ops"}
	refused({"admin": {"action": "cache.read"}, "tls": {"client_cert": c}})
}

test_star_is_not_a_policy_admin if refused(object.union(push("vvault/classes", {}), {"identity": mfa_admin}))

test_policy_admin_with_mfa_may_push_data if {
	allowed(object.union(push("vvault/classes", {}), {"identity": mfa_admin})) with data.vvault.admins as policy_admins
}

test_policy_admin_without_mfa_may_not_push if {
	refused(object.union(push("vvault/classes", {}), {"identity": object.union(mfa_admin, {"amr": ["pwd"]})})) with data.vvault.admins as policy_admins
	refused(push("vvault/classes", {})) with data.vvault.admins as policy_admins
}

test_policy_admin_with_an_unbound_mfa_token_may_not_push if {
	# a stolen admin certificate plus the thief's own MFA token: not bound to the certificate
	refused(object.union(push("vvault/classes", {}), {"identity": object.union(mfa_admin, {"cert_bound": false})})) with data.vvault.admins as policy_admins
	refused(object.union(push("vvault/classes", {}), {"identity": json.remove(mfa_admin, ["cert_bound"])})) with data.vvault.admins as policy_admins
}

test_policy_admin_with_stale_mfa_may_not_push if {
	refused(object.union(push("vvault/classes", {}), {"identity": object.union(mfa_admin, {"auth_time": 0})})) with data.vvault.admins as policy_admins
}

test_policy_push_needs_policy_admin_and_mfa if {
	i := at({"admin": {"action": "opa.policy.put"}, "tls": {"client_cert": ops}, "identity": mfa_admin})
	refused(i)
	allowed(i) with data.vvault.admins as policy_admins
}

test_data_push_of_a_grant_holds_the_grant_limits if {
	allowed(object.union(push("vvault/grants/CHG-1", kim_grant("2026-11-25T18:00:00Z")), {"identity": mfa_admin})) with data.vvault.admins as policy_admins
	refused(object.union(push("vvault/grants/CHG-1", kim_grant("2096-11-25T18:00:00Z")), {"identity": mfa_admin})) with data.vvault.admins as policy_admins
	refused(object.union(push("vvault/grants/CHG-1", object.union(kim_grant("2026-11-25T18:00:00Z"), {"role": "vvault-admin"})), {"identity": mfa_admin})) with data.vvault.admins as policy_admins
	refused(object.union(push("vvault/grants/OTHER", kim_grant("2026-11-25T18:00:00Z")), {"identity": mfa_admin})) with data.vvault.admins as policy_admins
}

test_data_push_never_replaces_the_grants_wholesale if {
	every path in ["vvault", "vvault/grants"] {
		refused(object.union(push(path, {}), {"identity": mfa_admin})) with data.vvault.admins as policy_admins
	}
}

test_nobody_may_grant_standing_admin if {
	d := admin.decision with input as {
		"admin": {"action": "grant.add", "body": object.union(kim_grant("2026-11-25T18:00:00Z"), {"role": "vvault-admin"})},
		"tls": {"client_cert": ops},
		"time": {"unix_ns": now},
	}
	d.allow == false
}
