"""Asking the policy: the OPA client, the decision cache (L1, then a shared store) and the
input paths a policy reads."""
