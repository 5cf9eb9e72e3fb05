-- Initial schema: characters with portraits, stories with their ordered frames, and the
-- durable generation job queue. Images live in the database (one file to back up).

CREATE TABLE characters (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    pronoun          TEXT    NOT NULL CHECK (pronoun IN ('he', 'she', 'they', 'it')),
    portrait         BLOB    NOT NULL,
    portrait_mime    TEXT    NOT NULL,
    portrait_width   INTEGER NOT NULL,
    portrait_height  INTEGER NOT NULL,
    portrait_sha256  TEXT    NOT NULL,
    created_at       TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL
);

CREATE TABLE stories (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    title       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

-- The cast of a story: which characters its captions may name.
CREATE TABLE story_characters (
    story_id      INTEGER NOT NULL REFERENCES stories (id) ON DELETE CASCADE,
    character_id  INTEGER NOT NULL REFERENCES characters (id) ON DELETE CASCADE,
    PRIMARY KEY (story_id, character_id)
);
CREATE INDEX story_characters_by_character ON story_characters (character_id);

-- One row per caption; `position` is 0-based and dense within a story.
CREATE TABLE frames (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    story_id     INTEGER NOT NULL REFERENCES stories (id) ON DELETE CASCADE,
    position     INTEGER NOT NULL,
    caption      TEXT    NOT NULL,
    status       TEXT    NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'queued', 'running', 'ready', 'stale', 'failed')),
    image        BLOB,
    image_mime   TEXT,
    seed         INTEGER,
    duration_ms  INTEGER,
    created_at   TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    UNIQUE (story_id, position)
);

-- Generation jobs: claimed by a worker atomically, in order of id.
CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    story_id         INTEGER NOT NULL REFERENCES stories (id) ON DELETE CASCADE,
    status           TEXT    NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    params           TEXT    NOT NULL,               -- JSON: frames, steps, guidance, seeds
    idempotency_key  TEXT    UNIQUE,
    progress         TEXT,                           -- JSON: latest frame/step progress
    error            TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts         INTEGER NOT NULL DEFAULT 0,
    worker           TEXT,
    created_at       TEXT    NOT NULL,
    started_at       TEXT,
    finished_at      TEXT
);
CREATE INDEX jobs_by_status ON jobs (status, id);
CREATE INDEX jobs_by_story ON jobs (story_id, id);

-- Every state change of a job, in order: what a reconnecting viewer replays.
CREATE TABLE job_events (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind        TEXT    NOT NULL,
    data        TEXT    NOT NULL,
    created_at  TEXT    NOT NULL
);
CREATE INDEX job_events_by_job ON job_events (job_id, id);
