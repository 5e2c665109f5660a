"""Storage: all SQL of dbos_nb (schema, migrations, the system store, queue claims)."""
