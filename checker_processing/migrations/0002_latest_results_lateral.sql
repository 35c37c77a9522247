-- latest_results as one primary-key probe per task.
--
-- The first definition joined tasks to check_results on (result_id, checked_at). The planner
-- multiplies the two equalities' selectivities, estimates 1 row, and - because run-time
-- partition pruning is not in its cost model - prefers a hash join that reads every partition:
-- 2.9 s for 10,000 tasks on 10 million rows. A LATERAL probe per task is what the data wants:
-- each task's latest row is one lookup of one partition's primary key, pruned at run time. Same
-- columns, same rows; 0.2 s in the same run (`bench/reports.py`, which times both; 1.2 s
-- against 0.14 s on a faster day, bench/results/reports.md).
CREATE OR REPLACE VIEW latest_results AS
SELECT r.*
FROM tasks t
CROSS JOIN LATERAL (
    SELECT *
    FROM check_results c
    WHERE c.result_id = t.last_result_id AND c.checked_at = t.last_checked_at
    LIMIT 1  -- never changes the result (primary key); keeps the plan a probe per task
) AS r;
