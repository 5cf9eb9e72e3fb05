-- Fair turns between stories (issue #18, item 7). Every claim of a job by a worker takes the
-- next turn number; the worker serves first the story whose latest turn is oldest (a story
-- never served before first of all), and the oldest queued job within that story. With the
-- worker handing a running job back to the queue between frames when another story waits,
-- a one-frame job no longer waits for the whole of another story's long job.
ALTER TABLE jobs ADD COLUMN turn INTEGER;
-- Jobs started before this migration: their ids keep the order they were served in.
UPDATE jobs SET turn = id WHERE started_at IS NOT NULL;
CREATE INDEX jobs_by_turn ON jobs (turn);
CREATE INDEX jobs_by_story_turn ON jobs (story_id, turn);
