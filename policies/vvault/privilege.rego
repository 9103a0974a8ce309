package vvault.authz

# Roles a user holds here: its token's roles in its own tenant, plus live JIT roles.
effective_roles contains role if {
	is_user
	input.identity.tenant == tenant
	some role in input.identity.roles
}

# Tenant-less routes (the app's own admin area): the token's roles as they are.
effective_roles contains role if {
	is_user
	not tenant
	some role in input.identity.roles
}

effective_roles contains grant.role if {
	some grant in live_grants
	grant.tenant == tenant
}

role_allows(role, op) if op in data.vvault.roles[role][data_class]

role_allows(role, op) if op in data.vvault.roles[role]["*"]

user_may if {
	some role in effective_roles
	role_allows(role, operation)
}

workload_may if {
	workload_home
	operation in workload.ops
}

workload_may if {
	some grant in workload_grants
	operation in grant.ops
}

deny contains "policy.operation_not_granted" if {
	is_user
	user_in_tenant
	operation
	not operation in data.vvault.control.operations
	not user_may
}

workload_reaches_tenant if workload_home

workload_reaches_tenant if count(workload_grants) > 0

deny contains "policy.operation_not_granted" if {
	not is_user
	workload_reaches_tenant
	operation
	not operation in data.vvault.control.operations
	not workload_may
}
