-- Photo processing (PostgreSQL): the jobs, their errors, the images waiting for
-- them, and the thumbnails they make. Append-only: change the schema in a
-- new file. Times are milliseconds since the Unix epoch by the database's
-- clock.

-- One job per photo (the primary key: a photo is processed once, however
-- often a request is retried), written in the transaction that writes the
-- photo (the outbox), so there is never a photo without its job or a job
-- without its photo.
CREATE TABLE photo_jobs (
    photo_id       TEXT    NOT NULL PRIMARY KEY,
    user_id        TEXT    NOT NULL,
    -- 'queued', 'running' (leased), 'done', 'discarded' (the dead letter).
    state          TEXT    NOT NULL,
    -- Attempts started; the latest one's number fences the others.
    attempt        BIGINT  NOT NULL DEFAULT 0,
    -- The last attempt allowed; raised by an operator's retry.
    max_attempt    BIGINT  NOT NULL,
    -- When a queued job is due (later than now while it backs off).
    run_after_ms   BIGINT  NOT NULL,
    -- When a running job's lease ends unless renewed.
    lease_until_ms BIGINT  NOT NULL DEFAULT 0,
    -- Who runs (or last ran) it.
    worker         TEXT    NOT NULL DEFAULT '',
    create_time_ms BIGINT  NOT NULL,
    update_time_ms BIGINT  NOT NULL
);

-- Claims take the oldest due queued job; rescues find lapsed leases.
CREATE INDEX photo_jobs_due ON photo_jobs (state, run_after_ms);
CREATE INDEX photo_jobs_by_lease ON photo_jobs (state, lease_until_ms);

-- Every failed attempt, kept with the job (an operator's discard too, under
-- the attempt it ended).
CREATE TABLE photo_job_errors (
    photo_id  TEXT    NOT NULL,
    attempt   BIGINT  NOT NULL,
    time_ms   BIGINT  NOT NULL,
    message   TEXT    NOT NULL,
    -- 1: retrying cannot help (the image itself is invalid).
    permanent BIGINT  NOT NULL
);

CREATE INDEX photo_job_errors_by_photo ON photo_job_errors (photo_id, attempt);

-- The uploaded image, until its job is done: then only the thumbnail and
-- the metadata remain (no original, so no GPS location, is kept).
CREATE TABLE photo_uploads (
    photo_id TEXT NOT NULL PRIMARY KEY,
    data     BYTEA NOT NULL
);

-- Thumbnails, in the database so that every replica serves them.
CREATE TABLE photo_thumbnails (
    photo_id     TEXT NOT NULL PRIMARY KEY,
    content_type TEXT NOT NULL,
    data         BYTEA NOT NULL
);
