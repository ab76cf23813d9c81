"""What is written to the database off the request path: request-log rows, usage, cache entries, in batches."""
