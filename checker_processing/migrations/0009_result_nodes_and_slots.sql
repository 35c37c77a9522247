-- Which checker node ran each check, and one result counted per (task, slot).
--
-- Several checker nodes share the tasks (docs/cluster.md). While one node is cut off from the
-- broker it keeps checking the tasks it last owned, and after the session time-out another node
-- checks them too: the same slot of a task (the result's scheduled_at) can then be checked
-- twice. Both results are stored, each naming its node; only one of them counts.
--
-- node: the result's `node` field (the checker's CHECKER_NODE_ID); NULL for results of checkers
-- before the field, and for every row stored before this migration.
--
-- double_of: NULL when the result counts; else the result_id of the result of the same task
-- and slot that was stored first and counts instead. Such a double is stored but moves neither
-- its task (latest_results) nor its incidents, and availability, the views below and
-- `checker-processing report` leave it out. Both columns are added without a default value:
-- no partition is rewritten.
ALTER TABLE check_results ADD COLUMN IF NOT EXISTS node text;
ALTER TABLE check_results ADD COLUMN IF NOT EXISTS double_of uuid;

-- The result that counts for each (task, slot): the first one stored, in the order the
-- processor read the results topic (a task's results are on one partition, so within a batch
-- the lowest offset; across batches the earlier batch). Only results with a scheduled_at (a
-- manual run has none) that are judged take a slot: a 'checker_overloaded' result says nothing
-- about the site, so a judged result of the same slot from another node still counts. The
-- writer inserts here in the same transaction as the rows; the primary key is the rule.
-- The key starts with the slot's time: results arrive roughly in time order, so its entries go
-- in at the right edge of the index, which costs half as much as (task_id, scheduled_at), whose
-- entries go in at one place per task (`bench/slots.py`: COPY of 200,000 slots of 1,000 tasks
-- beside their result ids, medians of 5 runs, 2.7 s more against 5.5 s more, where the ids
-- alone took 4.2 s; BENCHMARKS.md). Retention deletes the slots before the first kept day (a
-- range of the key: no other index needed).
CREATE TABLE IF NOT EXISTS result_slots (
    scheduled_at  timestamptz NOT NULL,
    task_id       uuid        NOT NULL,
    result_id     uuid        NOT NULL,
    PRIMARY KEY (scheduled_at, task_id)
);

-- `r.*` was expanded when the view was made: made again, it shows the new columns (last).
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

-- As in 0005, without the doubles: one result per (task, slot).
CREATE OR REPLACE VIEW availability_hourly AS
SELECT task_id,
       date_trunc('hour', checked_at, 'UTC') AS hour,
       count(*) FILTER (WHERE judged) AS checks,
       count(*) FILTER (WHERE ok) AS successes,
       round(100.0 * count(*) FILTER (WHERE ok) / nullif(count(*) FILTER (WHERE judged), 0), 3)
           AS uptime_percent,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY load_time) FILTER (WHERE judged) AS load_time_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY load_time) FILTER (WHERE judged) AS load_time_p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY load_time) FILTER (WHERE judged) AS load_time_p99,
       count(*) FILTER (WHERE NOT judged) AS not_judged
FROM (
    SELECT task_id, checked_at, ok, load_time,
           error_kind IS DISTINCT FROM 'checker_overloaded' AS judged
    FROM check_results
    WHERE double_of IS NULL
) AS r
GROUP BY task_id, date_trunc('hour', checked_at, 'UTC');

CREATE OR REPLACE VIEW availability_daily AS
SELECT task_id,
       (date_trunc('day', checked_at, 'UTC') AT TIME ZONE 'UTC')::date AS day,
       count(*) FILTER (WHERE judged) AS checks,
       count(*) FILTER (WHERE ok) AS successes,
       round(100.0 * count(*) FILTER (WHERE ok) / nullif(count(*) FILTER (WHERE judged), 0), 3)
           AS uptime_percent,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY load_time) FILTER (WHERE judged) AS load_time_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY load_time) FILTER (WHERE judged) AS load_time_p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY load_time) FILTER (WHERE judged) AS load_time_p99,
       count(*) FILTER (WHERE NOT judged) AS not_judged
FROM (
    SELECT task_id, checked_at, ok, load_time,
           error_kind IS DISTINCT FROM 'checker_overloaded' AS judged
    FROM check_results
    WHERE double_of IS NULL
) AS r
GROUP BY task_id, date_trunc('day', checked_at, 'UTC');
