"""Admission before any engine work: model allowlist, max_tokens cap, RPM/TPM, concurrency, monthly quotas, and the
brute-force limit on failed key checks per client address."""
