"""Runnable client examples and a small typed client for the native routes (imports schemas, never server)."""
