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

obligation := {"allow": true, "obligations": [{"type": "quarantine", "scope": "subject"}]}

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
