-- Whether a result's body was cut at the task's max_body_bytes (the checker reads and searches
-- only that much; before, such a check failed with body_too_large).
--
-- A constant default adds the column without rewriting any partition (PostgreSQL 11+), and
-- every row stored before had read its whole body: false is true of them.
ALTER TABLE check_results ADD COLUMN IF NOT EXISTS body_truncated boolean NOT NULL DEFAULT false;

-- `r.*` was expanded when the view was made: made again, it shows the new column (last).
CREATE OR REPLACE VIEW latest_results AS
SELECT r.*
FROM tasks t
CROSS JOIN LATERAL (
    SELECT *
    FROM check_results c
    WHERE c.result_id = t.last_result_id AND c.checked_at = t.last_checked_at
    LIMIT 1  -- never changes the result (primary key); keeps the plan a probe per task
) AS r;
