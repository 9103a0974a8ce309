# Test-only decisions: each answers with one shape the PEP must refuse (or
# honour), so the tests can drive every branch of enforce through real OPA.
package faults

plain_true := true

plain_false := false

string_decision := "yes"

allow_as_string := {"allow": "true"}

status_out_of_range := {"allow": false, "status": 200}

status_as_bool := {"allow": false, "status": true}

crlf_header := {"allow": true, "upstream_headers": {"X-A": "a\r\nX-Injected: 1"}}

reserved_header := {"allow": true, "upstream_headers": {"X-Forwarded-For": "10.0.0.1"}}

obligation := {"allow": true, "obligations": [{"type": "notify_soc", "channel": "pager"}]}

# Denies and quarantines the caller's subject (automated response).
quarantine_me := {
	"allow": false,
	"code": "policy.compromised",
	"reason": "suspicious activity",
	"obligations": [{"type": "quarantine", "scope": "subject", "ttl_s": 60, "reason": "test trip-wire"}],
}

custom_status := {
	"allow": false,
	"status": 429,
	"code": "policy.rate_limited",
	"reason": "slow down",
	"response_headers": {"Retry-After": "3"},
}

allow_with_headers := {
	"allow": true,
	"upstream_headers": {"X-Vvault-Tenant": input.route.params.tenant},
	"response_headers": {"X-Policy": "faults"},
}

# Two complete definitions that both hold: OPA answers 500 (eval_conflict_error).
conflict := 1 if input.request.method

conflict := 2 if input.request.method

# Allows and hands the identity it saw to the upstream, so tests can check
# what the policy input carried.
echo_identity := {
	"allow": true,
	"upstream_headers": {
		"X-Vvault-Kind": input.identity.kind,
		"X-Vvault-Subject": object.get(input.identity, "subject", ""),
		"X-Vvault-Bound": sprintf("%v", [object.get(input.identity, "cert_bound", false)]),
		"X-Vvault-Workload": object.get(input.identity, ["workload", "spiffe_id"], ""),
	},
}

# Allows and reports every input field a cache key could confuse, so a
# decision wrongly served from cache is visible at the upstream.
echo_all := {
	"allow": true,
	"upstream_headers": {"X-Vvault-Echo": json.marshal({
		"method": input.request.method,
		"path": input.request.path,
		"route": input.route.name,
		"subject": object.get(input.identity, "subject", null),
		"roles": object.get(input.identity, "roles", null),
		"issuer": object.get(input.identity, "issuer", null),
		"tenant": object.get(input.identity, "tenant", null),
		"cert": object.get(input.tls, ["client_cert", "sha256"], null),
	})},
}

# Denies subjects listed in data.faults_data.revoked (pushed by the tests).
default revoked_subjects := []

revoked_subjects := data.faults_data.revoked

subject_gate := {"allow": true} if {
	not input.identity.subject in revoked_subjects
} else := {"allow": false, "code": "policy.revoked", "reason": "subject revoked"}

no_store := {"allow": true, "cache": {"no_store": true}}

vary_subject := {"allow": true, "cache": {"vary": ["identity.subject"], "ttl_s": 30}}

# A new rule being rolled out: it would deny, but asks to be logged only.
monitor_only_deny := {"allow": false, "monitor_only": true, "code": "policy.new_rule", "reason": "trial"}

# Sets an identity header for the upstream that is not in a PEP-owned namespace.
sets_user := {"allow": true, "upstream_headers": {"X-User-Id": "alice", "X-Tenant": input.route.params.tenant}}

# Allows, but at most 2 requests in a burst per subject (a limit the policy picks).
policy_limited := {"allow": true, "rate_limit": {"per": "subject", "rate_per_s": 0.5, "burst": 2}}

# A "lister" may see that secrets exist, never their values (field-level least privilege).
lister := {"allow": true, "obligations": [{"type": "redact", "fields": ["value"]}]}

# Denies and quarantines the device the request comes from (automated response).
quarantine_device := {
	"allow": false,
	"code": "policy.compromised",
	"reason": "suspicious device",
	"obligations": [{"type": "quarantine", "scope": "device", "ttl_s": 60, "reason": "device trip-wire"}],
}
