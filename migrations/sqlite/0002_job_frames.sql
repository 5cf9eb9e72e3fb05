-- Generation jobs, second part: which frames each job draws (and how far it got with each),
-- the fingerprint of the request behind an Idempotency-Key, and the caption each stored
-- image was drawn from.

-- SHA-256 of the story id and the request body, so a retry with the same Idempotency-Key
-- can be told apart from a different request that reuses the key.
ALTER TABLE jobs ADD COLUMN request_hash TEXT;

-- The caption an image illustrates. A frame whose caption differs from it is `stale`;
-- editing the caption back makes it `ready` again.
ALTER TABLE frames ADD COLUMN image_caption TEXT;
UPDATE frames SET image_caption = caption WHERE image IS NOT NULL AND status <> 'stale';

-- The frames a job draws, in drawing order. Seeds are fixed when the job is queued, so a job
-- retried after a crash redraws exactly the frames it had not finished, identically.
-- `frame_id` becomes NULL when the frame is deleted while the job waits or runs.
CREATE TABLE job_frames (
    job_id    INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    ordinal   INTEGER NOT NULL,                 -- 1-based place in the job's drawing order
    position  INTEGER NOT NULL,                 -- 0-based caption index in the job's snapshot
    frame_id  INTEGER REFERENCES frames (id) ON DELETE SET NULL,
    seed      INTEGER NOT NULL,
    state     TEXT    NOT NULL DEFAULT 'queued'
              CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    PRIMARY KEY (job_id, ordinal)
);
CREATE INDEX job_frames_by_frame ON job_frames (frame_id, job_id);
