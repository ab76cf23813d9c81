"""Fakes shared by the tests: the in-process OpenAI-compatible upstream and its canned replies, and the fault
harnesses (a private PostgreSQL or Redis to stop and freeze, a model whose forward passes fail on demand)."""
