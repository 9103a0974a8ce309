package vvault.authz

# Risk gating (input.risk from the PEP): above one threshold reads only; above a higher
# one, deny and quarantine the subject.  An unavailable risk is not treated as low for
# the quarantine decision, but does not block reads either.
risk_score := input.risk.score if input.risk.available

deny contains "policy.risk_read_only" if {
	risk_score > data.vvault.risk.read_only_above
	not operation in {"read", "query"}
}

deny contains "policy.risk_quarantine" if risk_score > data.vvault.risk.quarantine_above

deny_obligations := [{
	"type": "quarantine",
	"scope": "subject",
	"ttl_s": data.vvault.risk.quarantine_ttl_s,
	"reason": sprintf("risk score %d", [risk_score]),
}] if "policy.risk_quarantine" in deny

else := []
