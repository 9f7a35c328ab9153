-- smki-repository schema, version 6: the change log that feeds every node's read replica.
--
-- One row per committed change that readers can see (certificates lodged, a status or flag
-- changed, a CRL/ARL or a document version lodged), numbered 1, 2, 3, ... in commit order:
-- a writer takes the advisory lock "SMKF" just before it inserts its row (max + 1) and holds
-- it until it commits, so no later number commits before an earlier one and no number is
-- skipped. A replica that has applied change N needs exactly the rows after N.
CREATE TABLE changes (
    seq     bigint      PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    kind    text        NOT NULL CHECK (kind IN ('certs', 'status', 'crl', 'doc')),
    lo      bigint,     -- certs: the new rows have lo < id <= hi ...
    hi      bigint,
    xact    bigint,     -- ... and lodge_xact = xact (other lodgings may share the id range)
    ids     bigint[]    -- status: certificate ids; crl: the CRL's id; doc: the document's id
);

-- The transaction that lodged a certificate (txid_current(), the top-level transaction even
-- inside a savepoint). NULL for rows lodged before this migration: replicas are built from
-- the table itself, the change log only carries what comes after. Added without a default
-- and given one afterwards, so existing rows are not rewritten.
ALTER TABLE certificates ADD COLUMN lodge_xact bigint;
ALTER TABLE certificates ALTER COLUMN lodge_xact SET DEFAULT txid_current();

-- Which repository a replica was built from: a replica of another store is rebuilt.
CREATE TABLE repository_identity (
    id          uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    one_row     boolean     NOT NULL DEFAULT true UNIQUE CHECK (one_row)
);
INSERT INTO repository_identity DEFAULT VALUES;
