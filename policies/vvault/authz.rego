# vvault data-plane decision: POST /v1/data/vvault/authz/decision
#
# One entry point for the vvault API's route family (secrets, rotations, collections,
# queries, the app's own admin area).  Deny by default; every deny names its code in
# `reasons`, the first (sorted) is the decision's `code`.  The rules live beside this
# file, one concern per file, all in this package:
#
#   principal.rego  who is calling: a user (token), a workload (SPIFFE), a registered client
#   resource.rego   which operation, on which tenant, path and data class
#   tenancy.rego    tenant isolation; cross-tenant only by explicit workload grant or JIT grant
#   privilege.rego  least privilege: roles → operations per data class; workload grants
#   device.rego     device posture required per data class
#   control.rego    control plane (rotate, admin): MFA, recent auth_time, standing role or JIT
#   risk.rego       risk gating: read-only above one threshold, quarantine above another
#   fields.rego     field-level least privilege (redact obligation)
#
# Data (policies/vvault/*/data.json → data.vvault.*): classes, roles, posture, control,
# risk, workloads, grants (JIT), plus trusted_issuers in policies/vvault/data.json.
package vvault.authz

default decision := {
	"allow": false,
	"status": 403,
	"code": "policy.denied",
	"reason": "denied by default",
	"reasons": ["policy.denied"],
}

messages := {
	"policy.no_client_cert": "a client certificate is required",
	"policy.untrusted_issuer": "the client certificate was not issued by a trusted CA",
	"policy.unknown_client": "this client is not registered",
	"policy.unknown_operation": "this route has no operation the policy knows",
	"policy.tenant_not_entitled": "the client is not entitled to this tenant",
	"policy.operation_not_granted": "no role or grant allows this operation on this data class",
	"policy.admin_denied": "the admin area is not open to this caller",
	"policy.device_required": "this data class needs a verified, managed, encrypted and patched device",
	"policy.mfa_required": "this operation needs multi-factor authentication",
	"policy.auth_too_old": "this operation needs a recent sign-in",
	"policy.elevation_required": "this operation needs a standing admin role or a live JIT grant",
	"policy.risk_read_only": "the current risk allows reads only",
	"policy.risk_quarantine": "the current risk is too high: the subject is quarantined",
}

reasons := sort(deny)

# The code shown to the client: the most fundamental failure first (who, where, then
# how), so the caller learns what to fix first; `reasons` lists them all.
priority := [
	"policy.risk_quarantine",
	"policy.no_client_cert",
	"policy.untrusted_issuer",
	"policy.unknown_client",
	"policy.unknown_operation",
	"policy.tenant_not_entitled",
	"policy.admin_denied",
	"policy.mfa_required",
	"policy.auth_too_old",
	"policy.elevation_required",
	"policy.operation_not_granted",
	"policy.device_required",
	"policy.risk_read_only",
]

ranked := [code | some code in priority; code in deny]

primary := ranked[0] if count(ranked) > 0

else := reasons[0]

tenant_header := tenant if tenant

else := ""

decision := {
	"allow": true,
	"code": "policy.allowed",
	"reason": sprintf("%s within an entitled tenant", [operation]),
	"upstream_headers": {
		"X-Vvault-Client": principal_id,
		"X-Vvault-Tenant": tenant_header,
		"X-Vvault-Data-Class": data_class,
	},
	"obligations": allow_obligations,
	"cache": cache_hints,
} if {
	count(deny) == 0
	is_string(principal_id)
}

decision := {
	"allow": false,
	"status": 403,
	"code": primary,
	"reason": object.get(messages, primary, "denied by policy"),
	"reasons": reasons,
	"obligations": deny_obligations,
	"cache": {"ttl_s": 5},
} if {
	count(deny) > 0
}

# The policy reads input.time, so the PEP keys its cache without the clock and keeps an
# answer only as long as these hints say: control-plane decisions (auth_time recency) are
# never stored; others end at the earliest expiry of a live JIT grant they may rest on.
cache_hints := {"no_store": true} if operation in data.vvault.control.operations

else := {"ttl_s": min({30, grant_ttl_s})} if grant_ttl_s

else := {"ttl_s": 30}

grant_ttl_s := max({0, ceil((min({time.parse_rfc3339_ns(g.not_after) | some g in live_grants}) - now_ns) / 1000000000) - 1}) if count(live_grants) > 0
