package vvault.admin_test

import data.vvault.admin

cert(spiffe) := {"issuer": "CN=vvault demo CA,O=vvault-pep demo", "spiffe_id": spiffe, "common_name": "x"}

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

test_ops_may_grant_a_grantable_role if {
	d := admin.decision with input as {
		"admin": {"action": "grant.add", "body": {"role": "key-admin", "subject": "kim"}},
		"tls": {"client_cert": cert("spiffe://demo.vvault/client/ops")},
	}
	d.allow == true
}

test_nobody_may_grant_standing_admin if {
	d := admin.decision with input as {
		"admin": {"action": "grant.add", "body": {"role": "vvault-admin", "subject": "kim"}},
		"tls": {"client_cert": cert("spiffe://demo.vvault/client/ops")},
	}
	d.allow == false
}
