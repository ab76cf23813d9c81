"""OpenAI wire formats, following the official API's field order and names."""
