-- smki-repository schema, version 12: an `import` into an empty store drops the
-- certificates table's non-unique indexes and builds them after its COPYs (issue 13). Each
-- dropped index's definition is kept here, in the same transaction as the DROP, and its row
-- deleted in the same transaction as the CREATE INDEX that rebuilds it: whatever the moment
-- an import dies (kill -9, power), the rows left name exactly the indexes still to build,
-- and the next start (any open of the store: `serve`, `import`, ...) builds them.
CREATE TABLE deferred_indexes (
    name        text        PRIMARY KEY,
    definition  text        NOT NULL,              -- pg_get_indexdef(): CREATE INDEX ...
    dropped_at  timestamptz NOT NULL DEFAULT now()
);
