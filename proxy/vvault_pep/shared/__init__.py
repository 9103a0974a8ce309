"""State shared between replicas: the Redis connection, containment (quarantines and
revocations), rate limits and risk signals.  None of it ever shrinks by absence."""
