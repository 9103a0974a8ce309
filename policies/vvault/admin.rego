# Who may use vvault-pep's admin API (quarantines, revocations, grants, cache, OPA data).
#
# The PEP asks POST /v1/data/vvault/admin/decision with
#   {"admin": {"action": "grant.add", "method": "POST", "path": "/admin/grants",
#              "body": {...}, "data_path": "vvault/grants/CHG-1" (OPA pushes only)},
#    "tls": {"client_cert": {...verified admin certificate...}},
#    "identity": {...the admin's verified bearer token, when one was sent...},
#    "time": {"unix_ns": ...}}
# Admins are listed in data.vvault.admins by the SPIFFE ID of their certificate's URI SAN
# (a certificate without one is "x509:" + its subject DN; a CN never names a SPIFFE ID),
# with the actions they may perform ("*" = every action except the OPA pushes).
# Deny by default.
package vvault.admin

default decision := {"allow": false, "status": 403, "code": "admin.denied", "reason": "not an admin for this action"}

cert := input.tls.client_cert

caller := cert.spiffe_id if {
	is_string(cert.spiffe_id)
	startswith(cert.spiffe_id, "spiffe://")
	object.get(cert, "uri_sans", [cert.spiffe_id]) == [cert.spiffe_id] # an X.509-SVID has exactly one URI SAN
} else := concat("", ["x509:", cert.subject]) if is_string(cert.subject)

grants := object.get(data.vvault.admins, caller, [])

now_ns := input.time.unix_ns

# OPA data and policy pushes can rewrite every rule and grant: they need the explicit
# policy-admin role (never implied by "*") and a fresh MFA sign-in of the same person:
# the token must be bound to the admin certificate (RFC 8705 cnf.x5t#S256, checked by
# the PEP as identity.cert_bound), so a stolen certificate plus the thief's own MFA
# token is not enough.
push_actions := {"opa.data.put", "opa.policy.put"}

may_act if {
	not input.admin.action in push_actions
	some granted in grants
	granted in {"*", input.admin.action}
}

may_act if {
	input.admin.action in push_actions
	"policy-admin" in grants
	mfa_recent
}

default max_auth_age_s := 900

max_auth_age_s := data.vvault.control.max_auth_age_s

mfa_recent if {
	input.identity.kind in {"user", "user+workload"}
	input.identity.cert_bound == true
	some method in input.identity.amr
	method in data.vvault.control.mfa_methods
	age_s := (now_ns / 1000000000) - input.identity.auth_time
	age_s <= max_auth_age_s
	age_s >= -30
}

# JIT grants may hand out only these roles, for at most max_grant_s, whatever channel
# writes them (/admin/grants or an OPA data push): an admin who may grant cannot make
# anyone (themselves included) a standing admin, nor a long-lived one.
default grantable_roles := ["reader", "lister", "writer", "pii-analyst", "key-admin"]

grantable_roles := data.vvault.grantable_roles

default max_grant_s := 86400

max_grant_s := data.vvault.max_grant_s

grant_ok(g, ticket) if {
	is_object(g)
	every field in ["subject", "issuer", "role", "tenant", "not_after", "ticket"] {
		is_string(g[field])
		g[field] != ""
	}
	g.ticket == ticket
	g.role in grantable_roles
	until := time.parse_rfc3339_ns(g.not_after)
	until > now_ns
	until <= now_ns + (max_grant_s * 1000000000)
}

# Where an OPA data push writes, relative to the grants: a single grant, the grants
# document or an ancestor of it (which could replace every grant at once), or elsewhere.
path_parts := split(input.admin.data_path, "/")

grants_parts := ["vvault", "grants"]

writes_one_grant if {
	count(path_parts) == 3
	array.slice(path_parts, 0, 2) == grants_parts
}

writes_many_grants if {
	count(path_parts) <= 2
	array.slice(grants_parts, 0, count(path_parts)) == path_parts
}

limits_respected if not input.admin.action in {"grant.add", "opa.data.put"}

limits_respected if {
	input.admin.action == "grant.add"
	grant_ok(input.admin.body, input.admin.body.ticket)
}

limits_respected if {
	input.admin.action == "opa.data.put"
	not writes_one_grant
	not writes_many_grants
}

limits_respected if {
	input.admin.action == "opa.data.put"
	writes_one_grant
	grant_ok(input.admin.body, path_parts[2])
}

decision := {"allow": true, "code": "admin.allowed"} if {
	cert.issuer in data.vvault.trusted_issuers
	may_act
	limits_respected
}
