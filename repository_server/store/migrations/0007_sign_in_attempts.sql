-- smki-repository schema, version 7: password attempts in flight, so that the SEC lockout
-- holds under concurrency (issue 14).
--
-- A password attempt (portal sign-in or password change, LDAP simple bind, SFTP password) is
-- registered here, under the account's row lock, *before* its password is checked, and is
-- removed in the transaction that records its outcome (a failure counted, or a success that
-- finds the account still unlocked). An attempt may begin only while the account's recent
-- failures plus the attempts in flight are below the limit, so a burst of N attempts gets at
-- most `lockout_failures` passwords checked, on any number of processes and nodes. A row
-- left by a process that died mid-check is counted as a failure by the next attempt once it
-- is `stale` (see Store.sign_in_begin): dying is not a way to get free guesses.
CREATE TABLE sign_in_attempts (
    id          bigserial    PRIMARY KEY,
    user_name   text         NOT NULL REFERENCES users (name) ON UPDATE CASCADE ON DELETE CASCADE,
    started_at  timestamptz  NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX sign_in_attempts_user ON sign_in_attempts (user_name);
