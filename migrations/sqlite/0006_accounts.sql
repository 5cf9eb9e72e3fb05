-- Accounts (issue #16): local users with argon2 password hashes, server-side sessions, API
-- tokens (stored as SHA-256 hashes, shown once), failed logins for throttling, and an owner
-- for characters and stories (their frames, jobs and exports follow the story).
--
-- Rows made before accounts existed, or while auth is off, have no owner; creating the first
-- user (an admin) gives them to that user.

CREATE TABLE users (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    name           TEXT    NOT NULL COLLATE NOCASE UNIQUE,
    password_hash  TEXT    NOT NULL,              -- PHC string (argon2id)
    is_admin       INTEGER NOT NULL DEFAULT 0,
    created_at     TEXT    NOT NULL
);

-- A browser session: the cookie carries a random secret, the table its SHA-256.
CREATE TABLE sessions (
    token_hash   TEXT PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    csrf_token   TEXT    NOT NULL,                -- what every form of the session carries
    created_at   TEXT    NOT NULL,
    expires_at   TEXT    NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id);

CREATE TABLE api_tokens (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id       INTEGER NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name          TEXT    NOT NULL,
    token_hash    TEXT    NOT NULL UNIQUE,
    prefix        TEXT    NOT NULL,               -- the first characters, to tell tokens apart
    created_at    TEXT    NOT NULL,
    last_used_at  TEXT,
    revoked_at    TEXT
);
CREATE INDEX api_tokens_by_user ON api_tokens (user_id, id);

-- Failed logins in the throttling window, per account name and per client address.
CREATE TABLE login_failures (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_name  TEXT NOT NULL COLLATE NOCASE,
    address    TEXT NOT NULL,
    at         TEXT NOT NULL
);
CREATE INDEX login_failures_by_name ON login_failures (user_name, at);
CREATE INDEX login_failures_by_address ON login_failures (address, at);

ALTER TABLE stories ADD COLUMN owner_id INTEGER REFERENCES users (id) ON DELETE CASCADE;
CREATE INDEX stories_by_owner ON stories (owner_id, id);

-- Character names become unique per owner (two users may each have a "Fred"), which SQLite
-- can only do by rebuilding the table. Dropping the old table cascades to the casts that
-- reference it (migrations run in a transaction, where foreign keys cannot be switched off),
-- so the casts are kept aside and put back; ids are unchanged.
CREATE TABLE characters_new (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    owner_id         INTEGER REFERENCES users (id) ON DELETE CASCADE,
    name             TEXT    NOT NULL COLLATE NOCASE,
    pronoun          TEXT    NOT NULL CHECK (pronoun IN ('he', 'she', 'they', 'it')),
    portrait         BLOB    NOT NULL,
    portrait_mime    TEXT    NOT NULL,
    portrait_width   INTEGER NOT NULL,
    portrait_height  INTEGER NOT NULL,
    portrait_sha256  TEXT    NOT NULL,
    created_at       TEXT    NOT NULL,
    updated_at       TEXT    NOT NULL
);
INSERT INTO characters_new (id, owner_id, name, pronoun, portrait, portrait_mime, portrait_width,
                            portrait_height, portrait_sha256, created_at, updated_at)
    SELECT id, NULL, name, pronoun, portrait, portrait_mime, portrait_width, portrait_height,
           portrait_sha256, created_at, updated_at
    FROM characters;
-- The id counter too, so the id of a deleted character is never given to another one (a
-- queued job names its cast by id).
CREATE TEMP TABLE kept_sequence AS SELECT seq FROM sqlite_sequence WHERE name = 'characters';
CREATE TEMP TABLE kept_casts AS SELECT rowid AS kept_rowid, story_id, character_id FROM story_characters;
DROP TABLE characters;
ALTER TABLE characters_new RENAME TO characters;
-- The cast order is the rowid order: put the rows back in it.
INSERT INTO story_characters (rowid, story_id, character_id)
    SELECT kept_rowid, story_id, character_id FROM kept_casts ORDER BY kept_rowid;
DROP TABLE kept_casts;
UPDATE sqlite_sequence SET seq = MAX(seq, COALESCE((SELECT seq FROM kept_sequence), 0))
    WHERE name = 'characters';
DROP TABLE kept_sequence;
CREATE UNIQUE INDEX characters_name_per_owner ON characters (COALESCE(owner_id, 0), name);
CREATE INDEX characters_by_owner ON characters (owner_id, id);
