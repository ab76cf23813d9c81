"""Database layer: SQLAlchemy models, the advanced-alchemy config, migrations and the store functions.

* :mod:`persistence.config` — ``make_engine_config(url)`` for Litestar's ``SQLAlchemyPlugin`` or standalone use;
* :mod:`persistence.migrate` — ``upgrade`` / ``downgrade`` / ``current`` / ``history`` / ``pending``;
* :mod:`persistence.store` — roles, keys, quotas, request logs and the completion cache;
* :mod:`persistence.models` — the tables.
"""
