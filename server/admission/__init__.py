"""Admission before any engine work: model allowlist, max_tokens cap, RPM/TPM, concurrency, monthly quotas."""
