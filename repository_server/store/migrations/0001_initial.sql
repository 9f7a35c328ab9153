-- smki-repository schema, version 1.
-- Certificates, CRLs and documents are never deleted (triggers below refuse it); the audit
-- table is append-only. DER bytes are stored exactly as lodged.

CREATE TABLE certificates (
    id                  bigserial PRIMARY KEY,
    serial              text        NOT NULL,          -- canonical upper-case hex
    issuer_dn           bytea       NOT NULL,          -- DER of the issuer Name, as in the cert
    issuer_name         text        NOT NULL,          -- RFC 4514, for people
    issuer_key_id       bytea,                         -- AKI keyIdentifier
    subject_dn          bytea       NOT NULL,
    subject_name        text        NOT NULL,
    subject_key_id      bytea,                         -- SKI
    eui64               bytea,                         -- device hwSerialNum / org x500UniqueIdentifier
    role                smallint,                      -- remote party role (decimal)
    usage               text CHECK (usage IN ('DS', 'KA', 'CA')),
    kind                text        NOT NULL CHECK (kind IN ('root', 'ca', 'organisation', 'device', 'other')),
    not_before          timestamptz NOT NULL,
    not_after           timestamptz NOT NULL,
    sha256              bytea       NOT NULL,
    sha1                bytea       NOT NULL,
    der                 bytea       NOT NULL,
    status              char(1)     NOT NULL DEFAULT 'I' CHECK (status IN ('P', 'I', 'N')),
    manufacturing_flag  boolean     NOT NULL DEFAULT false,
    lint                jsonb       NOT NULL DEFAULT '[]',  -- [{"code":..,"message":..}]
    issuer_verified     boolean     NOT NULL,          -- signature checked against a stored CA
    trust_anchor        boolean     NOT NULL DEFAULT false,
    lodged_at           timestamptz NOT NULL DEFAULT now(),
    lodged_by           text        NOT NULL
);
ALTER TABLE certificates ALTER COLUMN der SET STORAGE EXTERNAL;  -- DER is random: skip compression

CREATE UNIQUE INDEX certificates_sha256 ON certificates (sha256);
CREATE UNIQUE INDEX certificates_issuer_serial ON certificates (serial, issuer_dn);
CREATE INDEX certificates_sha1 ON certificates (sha1);
CREATE INDEX certificates_eui64 ON certificates (eui64) WHERE eui64 IS NOT NULL;
CREATE INDEX certificates_subject_key_id ON certificates (subject_key_id) WHERE subject_key_id IS NOT NULL;
CREATE INDEX certificates_issuer_key_serial ON certificates (issuer_key_id, serial);
CREATE INDEX certificates_ca ON certificates (subject_dn) WHERE kind IN ('root', 'ca');
CREATE INDEX certificates_lodged_at ON certificates (lodged_at);

CREATE TABLE crls (
    id              bigserial PRIMARY KEY,
    kind            text        NOT NULL CHECK (kind IN ('crl', 'arl')),
    issuer_dn       bytea       NOT NULL,
    issuer_name     text        NOT NULL,
    issuer_key_id   bytea       NOT NULL,             -- the issuing CA's key id (URL key)
    issuer_cert_id  bigint      NOT NULL REFERENCES certificates (id),
    crl_number      numeric     NOT NULL,
    this_update     timestamptz NOT NULL,
    next_update     timestamptz,
    sha256          bytea       NOT NULL,
    der             bytea       NOT NULL,
    revoked_count   integer     NOT NULL,
    lint            jsonb       NOT NULL DEFAULT '[]',
    lodged_at       timestamptz NOT NULL DEFAULT now(),
    lodged_by       text        NOT NULL,
    UNIQUE (issuer_key_id, crl_number)
);
CREATE UNIQUE INDEX crls_sha256 ON crls (sha256);

CREATE TABLE revoked_entries (
    crl_id          bigint      NOT NULL REFERENCES crls (id),
    serial          text        NOT NULL,
    revocation_date timestamptz NOT NULL,
    reason          text,
    PRIMARY KEY (crl_id, serial)
);
CREATE INDEX revoked_entries_serial ON revoked_entries (serial);

CREATE TABLE documents (
    id              bigserial PRIMARY KEY,
    name            text        NOT NULL CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$'),
    version         integer     NOT NULL CHECK (version >= 1),
    content_type    text        NOT NULL,
    body            bytea       NOT NULL,
    size            bigint      NOT NULL,
    sha256          bytea       NOT NULL,
    lodged_at       timestamptz NOT NULL DEFAULT now(),
    lodged_by       text        NOT NULL,
    UNIQUE (name, version)
);

CREATE TABLE audit (
    id              bigserial PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor           text        NOT NULL,             -- client identity or 'operator:<user>'
    on_behalf_of    text,                              -- the DCC officer, where given
    action          text        NOT NULL,             -- e.g. lodge.certificates, lodge.refused
    outcome         text        NOT NULL,             -- ok | noop | refused | conflict | invalid
    object          text,                              -- what it was about (serial, CRL, document)
    peer            text,
    detail          jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_at ON audit (at);

CREATE FUNCTION smki_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'smki-repository: % on % is not allowed (nothing is ever deleted)', TG_OP, TG_TABLE_NAME;
END $$;

CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION smki_refuse_change();
CREATE TRIGGER certificates_no_delete BEFORE DELETE ON certificates
    FOR EACH ROW EXECUTE FUNCTION smki_refuse_change();
CREATE TRIGGER crls_immutable BEFORE UPDATE OR DELETE ON crls
    FOR EACH ROW EXECUTE FUNCTION smki_refuse_change();
CREATE TRIGGER revoked_entries_immutable BEFORE UPDATE OR DELETE ON revoked_entries
    FOR EACH ROW EXECUTE FUNCTION smki_refuse_change();
CREATE TRIGGER documents_immutable BEFORE UPDATE OR DELETE ON documents
    FOR EACH ROW EXECUTE FUNCTION smki_refuse_change();
-- Only status and manufacturing flag of a certificate may change after lodging.
CREATE FUNCTION smki_certificate_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.der, NEW.serial, NEW.issuer_dn, NEW.sha256) IS DISTINCT FROM
       (OLD.der, OLD.serial, OLD.issuer_dn, OLD.sha256) THEN
        RAISE EXCEPTION 'smki-repository: certificate bytes are immutable';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER certificates_immutable_bytes BEFORE UPDATE ON certificates
    FOR EACH ROW EXECUTE FUNCTION smki_certificate_update();
