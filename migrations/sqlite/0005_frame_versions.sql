-- Frame history (issue #15, item 2): every image drawn for a frame is kept as a version,
-- with how it was drawn and which versions of the earlier frames it looked at. The frame row
-- keeps a copy of its current version's image (and `frame_attention` its maps), so reading a
-- story never touches the history; restoring a version copies it back.
CREATE TABLE frame_versions (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id     INTEGER NOT NULL REFERENCES frames (id) ON DELETE CASCADE,
    image        BLOB    NOT NULL,
    image_mime   TEXT    NOT NULL,
    caption      TEXT,                    -- the caption it was drawn from
    seed         INTEGER,
    duration_ms  INTEGER,
    options      TEXT,                    -- JSON: steps, guidance, scheduler, bundle, negative prompt
    job_id       INTEGER REFERENCES jobs (id) ON DELETE SET NULL,
    -- JSON array of [frame_id, version_id] for the frames before it, in story order, as they
    -- were when it was drawn (the images the LLM read); NULL when unknown (older images).
    context      TEXT,
    created_at   TEXT    NOT NULL
);
CREATE INDEX frame_versions_by_frame ON frame_versions (frame_id, id);

-- The heatmaps of each version (`frame_attention` holds the current version's).
CREATE TABLE frame_version_attention (
    version_id  INTEGER NOT NULL REFERENCES frame_versions (id) ON DELETE CASCADE,
    ordinal     INTEGER NOT NULL,
    text        TEXT    NOT NULL,
    characters  TEXT    NOT NULL,
    png         BLOB    NOT NULL,
    PRIMARY KEY (version_id, ordinal)
);

ALTER TABLE frames ADD COLUMN version_id INTEGER REFERENCES frame_versions (id) ON DELETE SET NULL;

-- Images drawn before this migration become each frame's first version (context unknown).
INSERT INTO frame_versions (frame_id, image, image_mime, caption, seed, duration_ms, created_at)
    SELECT id, image, COALESCE(image_mime, 'image/png'), image_caption, seed, duration_ms, updated_at
    FROM frames WHERE image IS NOT NULL;
UPDATE frames SET version_id = (SELECT v.id FROM frame_versions v WHERE v.frame_id = frames.id)
    WHERE image IS NOT NULL;
INSERT INTO frame_version_attention (version_id, ordinal, text, characters, png)
    SELECT f.version_id, a.ordinal, a.text, a.characters, a.png
    FROM frame_attention a JOIN frames f ON f.id = a.frame_id WHERE f.version_id IS NOT NULL;
