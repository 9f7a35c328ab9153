-- smki-repository schema, version 4: the LDAP directory walks devices and organisations in
-- (EUI-64, id) order, a page at a time (subtree and one-level searches, paged results).
-- (0003 is the portal's.)
CREATE INDEX certificates_kind_eui64_id ON certificates (kind, eui64, id) WHERE eui64 IS NOT NULL;
-- ... and asks whether ou=Other holds anything (hasSubordinates) without walking the table.
CREATE INDEX certificates_other ON certificates (id)
    WHERE kind = 'other' OR (kind IN ('device', 'organisation') AND eui64 IS NULL)
       OR (kind IN ('root', 'ca') AND subject_key_id IS NULL);
