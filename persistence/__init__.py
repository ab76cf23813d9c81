"""Database layer: SQLAlchemy models, the engine config, migrations and the store functions.

* :mod:`persistence.config` — ``create_engine(url)`` and ``make_engine_config(url)`` (the engine and its sessions);
* :mod:`persistence.migrate` — ``upgrade`` / ``downgrade`` / ``current`` / ``history`` / ``pending``;
* :mod:`persistence.store` — roles, keys, quotas, request logs and the completion cache;
* :mod:`persistence.models` — the tables.
"""
