"""Remote model providers: OpenAI-compatible upstreams reached over HTTP."""
