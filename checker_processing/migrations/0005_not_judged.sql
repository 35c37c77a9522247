-- Results that are not judged leave availability alone.
--
-- A result with error_kind 'checker_overloaded' says the checker held the check up past twice
-- its time-out (a stalled event loop, a full DNS pool): the site was not judged. Such a result
-- is stored, but it moves neither the task nor its incidents (writer.py), and here it is left
-- out of `checks`, `uptime_percent` and the load-time percentiles (its load time is the
-- checker's). It is counted apart in a new last column, `not_judged`. A period with only such
-- results has checks 0 and uptime_percent NULL (unknown, not 0).
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
) AS r
GROUP BY task_id, date_trunc('day', checked_at, 'UTC');
