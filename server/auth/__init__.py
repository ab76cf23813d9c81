"""API keys and principals: key format, digests, authentication with a short cache, guards."""
