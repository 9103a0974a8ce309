# Test-only decisions whose one field is almost right: each must end as
# pdp.malformed_decision (403), never as an allow or a forwarded deny.
package faults_strict

monitor_only_as_string := {"allow": false, "monitor_only": "false"}

monitor_only_as_number := {"allow": false, "monitor_only": 0}

nul_in_upstream_header := {"allow": true, "upstream_headers": {"X-A": "a\u0000b"}}

cr_in_upstream_header := {"allow": true, "upstream_headers": {"X-A": "a\rb"}}

lf_in_upstream_header := {"allow": true, "upstream_headers": {"X-A": "a\nb"}}

nul_in_response_header := {"allow": true, "response_headers": {"X-A": "a\u0000b"}}

lf_in_response_header := {"allow": true, "response_headers": {"X-A": "a\nb"}}

# The same shape, well-formed: proves the route itself forwards.
monitor_only_true := {"allow": false, "monitor_only": true, "code": "policy.rollout"}

clean_header := {"allow": true, "upstream_headers": {"X-A": "ab"}}
