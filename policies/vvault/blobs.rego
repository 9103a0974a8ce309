package vvault.authz

# Blobs: opaque objects of a tenant, /v1/tenants/{tenant}/blobs/{name}.  Read with GET or
# HEAD, written with PUT; the body is streamed and never part of the input.  A blob has
# the tenant's default data class (data.vvault.classes.default), so the roles that may
# read or write that class may read or write blobs; workload grants match the blob name.
is_blob if {
	family == "blobs"
	count(segs) == 5
}

operation := "read" if {
	is_blob
	method in {"GET", "HEAD"}
}

operation := "write" if {
	is_blob
	method == "PUT"
}

resource := segs[4] if is_blob

kind := "blobs" if is_blob
