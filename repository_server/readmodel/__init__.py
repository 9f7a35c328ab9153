"""The node-local read replica: a memory-mapped LMDB copy of what the read interfaces serve,
fed from PostgreSQL in change order (records: byte layout; env: reads and writes; feed:
build, catch up, follow, verify)."""
