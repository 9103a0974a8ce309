"""What the PEP says about itself: the audit record and its sinks, OPA-format decision logs,
metrics and traces."""
