-- The tasks as the task topic defines them (KAFKA_TASKS_TOPIC, docs/tasks-topic.md).
--
-- Until now a task's row held what its latest result said (name, URL, method, health). The
-- processor now also follows the task records: every change of a task sets its name, URL
-- (password masked), method, interval, status and status reason, and a tombstone sets
-- removed_at. A task record can come before the task's first result (two topics, no order
-- between them), so a row may exist without a result: the result columns may be NULL. A task
-- removed before the processor ever heard of it has a row with nothing but removed_at (so a
-- late result of it does not bring it back as a live task): name, URL and method may be NULL.
--
-- record_topic, record_partition and record_offset are where the record the row was last set
-- from is on the task topic: a record at or before it (a redelivery) changes nothing. A row
-- never set from a record (a task whose checker publishes no records) has them NULL and takes
-- its name, URL and method from its results, as before; once a record set it, results no
-- longer change them (a result checked before a rename may arrive after it).
ALTER TABLE tasks
    ALTER COLUMN name DROP NOT NULL,
    ALTER COLUMN url DROP NOT NULL,
    ALTER COLUMN method DROP NOT NULL,
    ALTER COLUMN last_result_id DROP NOT NULL,
    ALTER COLUMN last_checked_at DROP NOT NULL,
    ALTER COLUMN last_ok DROP NOT NULL,
    ALTER COLUMN last_health DROP NOT NULL;

ALTER TABLE tasks
    -- seconds between checks; NULL: once (or not known: a task seen only in its results)
    ADD COLUMN IF NOT EXISTS interval_seconds double precision,
    -- NULL: no task record seen yet
    ADD COLUMN IF NOT EXISTS status text CHECK (status IN ('active', 'paused', 'done', 'error')),
    ADD COLUMN IF NOT EXISTS status_reason text,
    -- when the definition or status last changed (the record's updated_at, else its Kafka time)
    ADD COLUMN IF NOT EXISTS changed_at timestamptz,
    -- when the task was removed (the tombstone's Kafka time); NULL: it exists
    ADD COLUMN IF NOT EXISTS removed_at timestamptz,
    ADD COLUMN IF NOT EXISTS record_topic text,
    ADD COLUMN IF NOT EXISTS record_partition integer,
    ADD COLUMN IF NOT EXISTS record_offset bigint;

-- Removed tasks leave the latest results (their history stays in check_results until
-- retention drops it). Same columns as before.
CREATE OR REPLACE VIEW latest_results AS
SELECT r.*
FROM tasks t
CROSS JOIN LATERAL (
    SELECT *
    FROM check_results c
    WHERE c.result_id = t.last_result_id AND c.checked_at = t.last_checked_at
    LIMIT 1  -- never changes the result (primary key); keeps the plan a probe per task
) AS r
WHERE t.removed_at IS NULL;
