-- smki-repository schema, version 11: CPM 8 counts that say what they were judged by (issue 15).
--
-- refused: requests answered 400/401/403 (and the like: see service_levels.REFUSED), which
-- obtained nothing lodged; counted here and left out of `received` and the percentage.
-- trt_seconds joins the key: a change of the Target Response Time starts new rows, so each
-- count is reported against the TRT it was judged by (before, a row was relabelled with
-- whatever TRT was in force at its last flush).
ALTER TABLE cpm_counts ADD COLUMN refused bigint NOT NULL DEFAULT 0;
ALTER TABLE cpm_counts DROP CONSTRAINT cpm_counts_pkey;
ALTER TABLE cpm_counts ADD PRIMARY KEY (month, interface, operation, user_name, trt_seconds);
