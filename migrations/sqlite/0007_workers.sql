-- Workers as their own processes (issue #17): a running job carries a lease that its worker
-- renews with heartbeats; a job whose lease ran out (its worker vanished) goes back to the
-- queue with the attempt counted, as after a crash. Workers announce themselves here.
ALTER TABLE jobs ADD COLUMN lease_until TEXT;
CREATE INDEX jobs_running_by_lease ON jobs (status, lease_until);

CREATE TABLE workers (
    id              TEXT PRIMARY KEY,        -- host/pid/random, unique per start
    host            TEXT    NOT NULL,
    pid             INTEGER NOT NULL,
    device          TEXT    NOT NULL,
    bundle          TEXT    NOT NULL,
    started_at      TEXT    NOT NULL,
    last_heartbeat  TEXT    NOT NULL,
    stopped_at      TEXT,                    -- a clean stop; a crash leaves it NULL
    job_id          INTEGER REFERENCES jobs (id) ON DELETE SET NULL
);
CREATE INDEX workers_by_heartbeat ON workers (last_heartbeat);
