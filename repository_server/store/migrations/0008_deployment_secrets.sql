-- smki-repository schema, version 8: secrets generated per deployment (the portal's CSRF
-- key, ...), never in the source. One row per secret, made by whichever process asks first
-- (INSERT ... ON CONFLICT DO NOTHING, then read back): every process and node of a
-- deployment uses the same one, so a form served by one node is accepted by another.
CREATE TABLE deployment_secrets (
    name        text        PRIMARY KEY,
    secret      bytea       NOT NULL CHECK (length(secret) >= 32),
    created_at  timestamptz NOT NULL DEFAULT now()
);
