"""Wire formats (msgspec Structs only): OpenAI-compatible under ``schemas.openai``, native under ``schemas.native``."""
