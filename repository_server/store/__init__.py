"""The store of record: PostgreSQL through asyncpg. All SQL lives in `store.db`."""
