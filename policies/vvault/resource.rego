package vvault.authz

# What is asked, read from the canonical path's segments (not from route names, so the
# PEP's route table can be organised freely): /v1/tenants/{tenant}/{family}/...
segs := input.request.segments

method := input.request.method

in_tenant if {
	segs[0] == "v1"
	segs[1] == "tenants"
	count(segs) >= 4
}

family := segs[3] if in_tenant

family := "admin" if {
	segs[0] == "v1"
	segs[1] == "admin"
}

tenant := segs[2] if in_tenant

operation := "read" if {
	family in {"secrets", "collections"}
	method in {"GET", "HEAD"}
}

operation := "write" if {
	family == "secrets"
	method == "PUT"
}

operation := "delete" if {
	family == "secrets"
	method == "DELETE"
}

operation := "rotate" if {
	family == "rotations"
	method == "POST"
}

operation := "query" if {
	family == "collections"
	count(segs) == 6
	segs[5] == "query"
	method == "POST"
}

operation := "write" if {
	family == "collections"
	count(segs) == 6
	segs[5] == "vectors"
	method == "POST"
}

operation := "admin" if family == "admin"

deny contains "policy.unknown_operation" if not operation

# the resource inside the tenant: a secret's path, or a collection's name
resource := concat("/", array.slice(segs, 4, count(segs))) if family in {"secrets", "rotations"}

resource := segs[4] if {
	family == "collections"
	count(segs) > 4
}

kind := "secrets" if family in {"secrets", "rotations"}

kind := "collections" if family == "collections"

# data class: first matching secret prefix, the collection's class, else the default
secret_classes := [r.class | some r in data.vvault.classes.secrets; startswith(resource, r.prefix)]

data_class := secret_classes[0] if {
	kind == "secrets"
	count(secret_classes) > 0
} else := data.vvault.classes.collections[resource] if {
	kind == "collections"
} else := data.vvault.classes.default
