# Starter decision for the vvault API behind vvault-pep.
#
# The PEP asks POST /v1/data/vvault/authz/decision with the v1 policy input
# (docs/policy-input.md) and expects the decision object documented in
# docs/decisions.md.  Deny is the default; every deny names its code.
#
# Rules:
#   * a client certificate issued by a trusted CA (data.vvault.trusted_issuers)
#     is required — the PEP already verified the chain, this pins the issuer;
#   * the caller (SPIFFE ID, else certificate CN) must be entitled to the
#     tenant named in the path (data.vvault.clients);
#   * reads are allowed (GET/HEAD, and POST on a collection query); writes and
#     everything under the admin area are denied;
#   * routes in data.vvault.device_required_routes need a verified, managed device.
package vvault.authz

default decision := {
	"allow": false,
	"status": 403,
	"code": "policy.denied",
	"reason": "denied by default",
}

cert := input.tls.client_cert

client_id := cert.spiffe_id if {
	is_string(cert.spiffe_id)
} else := cert.common_name

read_methods := {"GET", "HEAD"}

is_read if input.request.method in read_methods

is_read if {
	input.route.name == "collection_query"
	input.request.method == "POST"
}

messages := {
	"policy.no_client_cert": "a client certificate is required",
	"policy.untrusted_issuer": "the client certificate was not issued by a trusted CA",
	"policy.unknown_client": "this client is not registered",
	"policy.tenant_not_entitled": "the client is not entitled to this tenant",
	"policy.admin_denied": "the admin area is not open through this gateway",
	"policy.write_denied": "only reads are allowed",
	"policy.device_required": "this route needs a verified, managed device",
}

deny contains "policy.no_client_cert" if not is_object(cert)

deny contains "policy.untrusted_issuer" if {
	is_object(cert)
	not cert.issuer in data.vvault.trusted_issuers
}

deny contains "policy.unknown_client" if {
	is_object(cert)
	not data.vvault.clients[client_id]
}

deny contains "policy.tenant_not_entitled" if {
	tenant := input.route.params.tenant
	not tenant in object.get(data.vvault.clients, [client_id, "tenants"], [])
}

deny contains "policy.admin_denied" if startswith(input.route.name, "admin")

deny contains "policy.write_denied" if not is_read

# Sensitive routes need a verified device assertion from a managed device.
default device_required_routes := []

device_required_routes := data.vvault.device_required_routes

deny contains "policy.device_required" if {
	input.route.name in device_required_routes
	not device_ok
}

device_ok if {
	input.device.verified == true
	input.device.managed == true
}

decision := {
	"allow": true,
	"code": "policy.allowed",
	"reason": "read within an entitled tenant",
	"upstream_headers": {"X-Vvault-Client": client_id},
} if {
	count(deny) == 0
	is_string(client_id)
}

decision := {
	"allow": false,
	"status": 403,
	"code": first,
	"reason": messages[first],
	"reasons": sorted_deny,
} if {
	count(deny) > 0
	sorted_deny := sort(deny)
	first := sorted_deny[0]
}
