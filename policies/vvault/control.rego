package vvault.authz

now_ns := input.time.unix_ns

# JIT elevation: grants in data.vvault.grants (keyed by ticket), honoured only for their
# subject and only before not_after — they stop working by themselves.
live_grants contains grant if {
	is_user
	some ticket, grant in data.vvault.grants
	grant.subject == input.identity.subject
	time.parse_rfc3339_ns(grant.not_after) > now_ns
}

control_op if operation in data.vvault.control.operations

mfa if {
	some method in input.identity.amr
	method in data.vvault.control.mfa_methods
}

recent_auth if {
	age_s := (now_ns / 1000000000) - input.identity.auth_time
	age_s <= data.vvault.control.max_auth_age_s
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

elevated if {
	some grant in live_grants
	object.get(grant, "tenant", tenant) == tenant
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
