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

decision := {"allow": true, "code": "admin.allowed"} if {
	input.tls.client_cert.issuer in data.vvault.trusted_issuers
	some granted in grants
	granted in {"*", input.admin.action}
}
