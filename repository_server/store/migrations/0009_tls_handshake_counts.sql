-- Refused TLS handshakes, counted (not one audit row each): per minute, listener, reason and
-- peer address; past tls.refusal_peers_per_minute distinct peers a minute and listener the
-- rest are summed under peer 'other'. Every process adds its counts (ON CONFLICT ... +).
CREATE TABLE tls_refusals (
    minute      timestamptz NOT NULL,   -- the minute's start
    listener    text        NOT NULL,   -- lodge, https, ldaps
    reason      text        NOT NULL,   -- no_certificate, unknown_ca, expired, timeout, ...
    peer        text        NOT NULL,   -- an IP address, or 'other'
    count       bigint      NOT NULL,
    detail      text        NOT NULL,   -- the last one's detail (e.g. the verify message)
    PRIMARY KEY (minute, listener, reason, peer)
);
