package vvault.authz

# A user acts in its own tenant, or where a live JIT grant puts it.
user_in_tenant if {
	is_user
	input.identity.tenant == tenant
}

user_in_tenant if {
	is_user
	some grant in live_grants
	grant.tenant == tenant
}

# A workload acts in its home tenants, or where its SPIFFE ID holds an explicit grant
# for this path — never because of a role.
workload_home if tenant in workload.tenants

resource_path := resource if resource

else := ""

workload_grants contains grant if {
	some grant in object.get(workload, "grants", [])
	grant.tenant == tenant
	some prefix in grant.paths
	startswith(resource_path, prefix)
}

deny contains "policy.tenant_not_entitled" if {
	is_string(tenant)
	is_user
	not user_in_tenant
}

deny contains "policy.tenant_not_entitled" if {
	is_string(tenant)
	not is_user
	workload
	not workload_home
	count(workload_grants) == 0
}
