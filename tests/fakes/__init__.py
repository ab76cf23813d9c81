"""Fakes shared by the tests: the in-process OpenAI-compatible upstream and its canned replies (``upstream``,
``replies``), FakeEngine variations (``engines``) and the fault harnesses (``faults``: a private PostgreSQL or Redis
to stop and freeze, a model whose forward passes fail on demand)."""
