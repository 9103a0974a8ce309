package vvault.authz

now_ns := input.time.unix_ns

# JIT elevation: grants in data.vvault.grants (keyed by ticket), honoured only for their
# issuer-qualified subject (corp's kim is not another issuer's kim), only for a role the
# library knows, and only before not_after — they stop working by themselves.
live_grants contains grant if {
	is_user
	some ticket, grant in data.vvault.grants
	is_string(grant.issuer)
	grant.issuer == input.identity.issuer
	grant.subject == input.identity.subject
	data.vvault.roles[grant.role]
	time.parse_rfc3339_ns(grant.not_after) > now_ns
}

control_op if operation in data.vvault.control.operations

mfa if {
	some method in input.identity.amr
	method in data.vvault.control.mfa_methods
}

# Recent: signed in within max_auth_age_s, and not in the future (beyond the clock skew
# the PEP allows): a future auth_time is a forged or broken token, never "recent".
recent_auth if {
	is_number(input.identity.auth_time)
	age_s := (now_ns / 1000000000) - input.identity.auth_time
	age_s <= data.vvault.control.max_auth_age_s
	age_s >= 0 - data.vvault.control.max_clock_skew_s
}

standing if {
	some role in input.identity.roles
	role in data.vvault.control.standing_roles
	input.identity.tenant == tenant
}

standing if {
	some role in input.identity.roles
	role in data.vvault.control.standing_roles
	not tenant
}

elevated if standing

# A live grant elevates only to what its own role permits here: a read-only grant is
# no licence for a rotation the token's standing roles would otherwise allow.
elevated if {
	some grant in live_grants
	object.get(grant, "tenant", tenant) == tenant
	role_allows(grant.role, operation)
}

deny contains "policy.admin_denied" if {
	control_op
	not is_user
}

deny contains "policy.mfa_required" if {
	control_op
	is_user
	not mfa
}

deny contains "policy.auth_too_old" if {
	control_op
	is_user
	mfa
	not recent_auth
}

deny contains "policy.elevation_required" if {
	control_op
	is_user
	not elevated
}

deny contains "policy.operation_not_granted" if {
	control_op
	is_user
	elevated
	not user_may
}
