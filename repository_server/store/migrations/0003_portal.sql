-- smki-repository schema, version 3: the browser portal's sign-in state, shared by every
-- process and node (SEC: 5 wrong passwords within an hour lock the account for an hour).

-- One row per user that has failed to sign in: the times of the recent failures (at most the
-- threshold's worth) and, when locked, until when. Updated under FOR UPDATE so two nodes
-- counting failures of the same user at once cannot both miss the fifth.
CREATE TABLE portal_accounts (
    user_name     text          PRIMARY KEY REFERENCES users (name) ON UPDATE CASCADE,
    failures      timestamptz[] NOT NULL DEFAULT '{}',
    locked_until  timestamptz
);

-- Signed-in sessions. Only the SHA-256 of the session token (the cookie) is stored, so a
-- reader of the table cannot take over a session.
CREATE TABLE portal_sessions (
    token_sha256  bytea         PRIMARY KEY,
    user_name     text          NOT NULL REFERENCES users (name) ON UPDATE CASCADE,
    created_at    timestamptz   NOT NULL,
    last_seen     timestamptz   NOT NULL
);
CREATE INDEX portal_sessions_user ON portal_sessions (user_name);
CREATE INDEX portal_sessions_last_seen ON portal_sessions (last_seen);

-- A new password (a change, or an operator's `users reset`) or disabling a user ends every
-- session of that user, whichever program made the change: the portal signs the user in
-- afresh after a change of their own.
CREATE FUNCTION smki_end_portal_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.password_hash IS DISTINCT FROM OLD.password_hash
       OR (NEW.disabled AND NOT OLD.disabled) THEN
        DELETE FROM portal_sessions WHERE user_name = NEW.name;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER users_end_portal_sessions AFTER UPDATE OF password_hash, disabled ON users
    FOR EACH ROW EXECUTE FUNCTION smki_end_portal_sessions();
