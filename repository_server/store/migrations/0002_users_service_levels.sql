-- smki-repository schema, version 2: relying-party users and their credentials, Code
-- Performance Measure 8 counters and demand per SEC time band.

CREATE TABLE users (
    id                   bigserial PRIMARY KEY,
    name                 text        NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$'),
    role                 text        NOT NULL DEFAULT 'party' CHECK (role IN ('party', 'operator')),
    api_key_sha256       bytea       UNIQUE,              -- SHA-256 of the key; the key itself is never stored
    api_key_hint         text,                            -- first characters, to tell keys apart in listings
    password_hash        text,                            -- scrypt$n$r$p$salt$hash (portal sign-in)
    must_change_password boolean     NOT NULL DEFAULT true,
    disabled             boolean     NOT NULL DEFAULT false,
    forecast_per_day     bigint      CHECK (forecast_per_day IS NULL OR forecast_per_day >= 0),
    forecast_bands       smallint[]  CHECK (forecast_bands IS NULL OR cardinality(forecast_bands) = 4),
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- One row per calendar month (UK) x interface x operation x user, added to by every server
-- process at each flush. buckets[i] counts answers within LATENCY_BOUNDS[i] (service_levels.py).
CREATE TABLE cpm_counts (
    month        text     NOT NULL,                       -- YYYY-MM, UK local time of receipt
    interface    text     NOT NULL,                       -- ws, download, ldap, portal
    operation    text     NOT NULL,
    user_name    text     NOT NULL,                       -- '-' = anonymous
    received     bigint   NOT NULL DEFAULT 0,
    answered     bigint   NOT NULL DEFAULT 0,             -- responses written (not 5xx)
    within_trt   bigint   NOT NULL DEFAULT 0,
    failed       bigint   NOT NULL DEFAULT 0,             -- 5xx answers
    seconds_sum  double precision NOT NULL DEFAULT 0,
    buckets      bigint[] NOT NULL,
    trt_seconds  double precision NOT NULL,               -- the TRT in force at the last flush
    PRIMARY KEY (month, interface, operation, user_name)
);

-- Requests per user per UK day per SEC time band (0: 00-07, 1: 07-08, 2: 08-20, 3: 20-24).
CREATE TABLE demand_counts (
    day        date     NOT NULL,
    user_name  text     NOT NULL,
    band       smallint NOT NULL CHECK (band BETWEEN 0 AND 3),
    requests   bigint   NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user_name, band)
);
