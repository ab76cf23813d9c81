"""Native (non-OpenAI) wire formats."""
