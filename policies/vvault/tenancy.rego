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
# for this kind of resource and path — never because of a role.  A grant names its kind
# (secrets, collections) and its paths match on segment boundaries: "docs" is the
# collection docs (and anything below it), never docs-hr or the secret docs-signing-key.
workload_home if tenant in workload.tenants

resource_segments := split(resource, "/") if resource

workload_grants contains grant if {
	some grant in object.get(workload, "grants", [])
	grant.tenant == tenant
	grant.kind == kind
	some path in grant.paths
	under(resource_segments, path)
}

# `path` ("a/b", "a/b/" alike) names resource_segments or an ancestor of them.
under(segments, path) if {
	want := [s | some s in split(path, "/"); s != ""]
	count(want) > 0
	count(segments) >= count(want)
	array.slice(segments, 0, count(want)) == want
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
