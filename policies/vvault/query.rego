# Vector queries whose body the policy reads (routes with `body: {inspect: json}`).
#
# The PEP puts the parsed JSON body in input.request.body and says whether it was cut at
# the route's inspection limit (input.request.body_truncated).  On such a route a query
# must carry a body, within the limit, asking for at most data.vvault.query.max_top_k
# neighbours and filtering only on data.vvault.query.filter_fields.  Routes that do not
# inspect bodies have no body_truncated field and are not judged here.
package vvault.authz

body_inspected if is_boolean(input.request.body_truncated)

query_body := input.request.body if {
	operation == "query"
	body_inspected
}

deny contains "policy.query_body_required" if {
	operation == "query"
	body_inspected
	not input.request.body_truncated
	not is_object(input.request.body)
}

deny contains "policy.query_too_large" if {
	operation == "query"
	input.request.body_truncated == true
}

deny contains "policy.query_top_k" if {
	is_object(query_body)
	not valid_top_k(object.get(query_body, "top_k", null))
}

deny contains "policy.query_filter" if {
	is_object(query_body)
	"filter" in object.keys(query_body)
	not is_object(query_body.filter)
}

deny contains "policy.query_filter" if {
	is_object(query_body.filter)
	some field in object.keys(query_body.filter)
	not field in data.vvault.query.filter_fields
}

valid_top_k(k) if {
	is_number(k)
	k == floor(k)
	k >= 1
	k <= data.vvault.query.max_top_k
}
