-- Workers as their own processes (issue #17); see migrations/sqlite/0007_workers.sql.
ALTER TABLE jobs ADD COLUMN lease_until TEXT;
CREATE INDEX jobs_running_by_lease ON jobs (status, lease_until);

CREATE TABLE workers (
    id              TEXT PRIMARY KEY,
    host            TEXT   NOT NULL,
    pid             BIGINT NOT NULL,
    device          TEXT   NOT NULL,
    bundle          TEXT   NOT NULL,
    started_at      TEXT   NOT NULL,
    last_heartbeat  TEXT   NOT NULL,
    stopped_at      TEXT,
    job_id          BIGINT REFERENCES jobs (id) ON DELETE SET NULL
);
CREATE INDEX workers_by_heartbeat ON workers (last_heartbeat);
