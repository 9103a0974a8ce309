"""The pure middle of the walk: no sockets, no Redis, no aiohttp.

The canonical request and the client certificate as data (:mod:`.request`), the typed subject
(:mod:`.principal`), sanitizing, routing, the policy input, the decision's interpretation and
its obligations, the problem+json body of a refusal, redaction and the cache key.  Everything
here is a function over frozen data, tested with tables.
"""
