# Who may use vvault-pep's admin API (quarantines, revocations, cache, OPA data).
#
# The PEP asks POST /v1/data/vvault/admin/decision with
#   {"admin": {"action": "quarantine.add", "method": "POST", "path": "/admin/quarantines"},
#    "tls": {"client_cert": {...verified admin certificate...}}}
# Admins are listed by SPIFFE ID (else certificate CN) in data.vvault.admins with the
# actions they may perform ("*" = all).  Deny by default.
package vvault.admin

default decision := {"allow": false, "status": 403, "code": "admin.denied", "reason": "not an admin for this action"}

caller := input.tls.client_cert.spiffe_id if {
	is_string(input.tls.client_cert.spiffe_id)
} else := input.tls.client_cert.common_name

grants := object.get(data.vvault.admins, caller, [])

# JIT grants may hand out only these roles, and never for longer than the API allows:
# an admin who may grant cannot make anyone (themselves included) a standing admin.
default grantable_roles := ["reader", "lister", "writer", "pii-analyst", "key-admin"]

grantable_roles := data.vvault.grantable_roles

limits_respected if input.admin.action != "grant.add"

limits_respected if {
	input.admin.action == "grant.add"
	input.admin.body.role in grantable_roles
}

decision := {"allow": true, "code": "admin.allowed"} if {
	input.tls.client_cert.issuer in data.vvault.trusted_issuers
	some granted in grants
	granted in {"*", input.admin.action}
	limits_respected
}
