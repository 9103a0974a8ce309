package vvault.authz

# Risk gating (input.risk from the PEP): above one threshold reads only; above a higher
# one, deny and quarantine the subject.  Unknown is not low: when the PEP could not
# assess risk (no Redis, Redis down, risk off) the request is put in the band named by
# data.vvault.risk.unavailable_band — "read_only" unless the data says otherwise — so
# writes, rotations and the control plane wait until risk can be judged.
risk_known if input.risk.available == true

risk_score := input.risk.score if {
	risk_known
	is_number(input.risk.score)
}

default unavailable_band := "read_only"

unavailable_band := data.vvault.risk.unavailable_band

read_only_band if risk_score > data.vvault.risk.read_only_above

read_only_band if {
	not risk_known
	unavailable_band == "read_only"
}

# Available but without a usable score: as unknown.
read_only_band if {
	risk_known
	not risk_score
}

deny contains "policy.risk_read_only" if {
	read_only_band
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
