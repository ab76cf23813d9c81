"""Alembic migrations of the llm-server database (a package so it ships in the wheel and is found from it)."""
