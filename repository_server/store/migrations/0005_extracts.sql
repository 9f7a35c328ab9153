-- smki-repository schema, version 5: extracts (full and delta) of everything lodged.

-- A certificate's lodged status or ManufacturingFlag changed after lodging: the change takes
-- the next number of this sequence, so a delta extract finds every change since the previous
-- extract through an index, whatever the table's size. NULL = never changed (added without a
-- default, so existing rows are not rewritten).
CREATE SEQUENCE certificate_changes_seq;
ALTER TABLE certificates ADD COLUMN changed_seq bigint;
CREATE INDEX certificates_changed_seq ON certificates (changed_seq) WHERE changed_seq IS NOT NULL;

-- Every extract produced (or being produced). The markers are the highest certificate id,
-- change number, CRL id and document id it covers: the next delta starts after them.
-- Only one process in the cluster produces extracts at a time (an advisory lock), and
-- `slot` (the schedule tick, e.g. "full 2026-11-22T02:00") is unique (failures apart), so a tick seen by
-- several processes gives one extract.
CREATE TABLE extracts (
    id               bigserial   PRIMARY KEY,
    name             text        NOT NULL UNIQUE,
    kind             text        NOT NULL CHECK (kind IN ('full', 'delta')),
    slot             text,                           -- NULL for one made on demand
    state            text        NOT NULL DEFAULT 'producing'
                                 CHECK (state IN ('producing', 'published', 'failed', 'removed')),
    started_at       timestamptz NOT NULL DEFAULT now(),
    published_at     timestamptz,
    removed_at       timestamptz,
    previous_id      bigint      REFERENCES extracts (id),
    cert_id_upto     bigint      NOT NULL,
    change_upto      bigint      NOT NULL,
    crl_id_upto      bigint      NOT NULL,
    document_id_upto bigint      NOT NULL,
    size             bigint,
    sha256           bytea,
    counts           jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX extracts_state ON extracts (state, id);
CREATE UNIQUE INDEX extracts_slot ON extracts (slot) WHERE state <> 'failed';

-- SFTP (extract downloads): each user's authorized public keys, OpenSSH one-line form
-- ("ssh-ed25519 AAAA... comment"). Passwords are the portal's.
ALTER TABLE users ADD COLUMN ssh_keys text[] NOT NULL DEFAULT '{}';
