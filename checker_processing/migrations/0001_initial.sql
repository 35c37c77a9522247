-- Results, tasks, incidents and rejected messages. Every object is created in the first schema
-- of search_path, so a deployment (or a test) can keep its own schema.

-- One row per check result, range-partitioned by UTC day on the check time.
--
-- Uniqueness: a partitioned table can only enforce uniqueness that includes the partition key,
-- so the key is (result_id, checked_at). That is as strong as a unique result_id here because
-- checked_at is a deterministic function of the message: the checker stamps the time once and
-- every redelivery or republish carries the same bytes; a first-version message gets its
-- result_id from (topic, partition, offset), which also pins the same bytes and timestamp.
-- The alternative (a side table result_ids(result_id PRIMARY KEY)) would cost a second index
-- write per row and could not be dropped with the day's partition.
CREATE TABLE IF NOT EXISTS check_results (
    result_id        uuid             NOT NULL,
    checked_at       timestamptz      NOT NULL,
    task_id          uuid             NOT NULL,
    name             text             NOT NULL,
    url              text             NOT NULL,
    method           text             NOT NULL,
    scheduled_at     timestamptz,
    attempt          integer          NOT NULL,
    status_code      smallint,
    load_time        double precision NOT NULL,
    pattern_result   text             CHECK (pattern_result IN ('match', 'no_match')),
    ok               boolean          NOT NULL,
    health           text             NOT NULL CHECK (health IN ('unknown', 'up', 'down')),
    error_kind       text,
    error_message    text,
    dns_time         double precision,
    connect_time     double precision,
    tls_time         double precision,
    ttfb_time        double precision,
    transfer_time    double precision,
    bytes            bigint           NOT NULL,
    final_url        text,
    redirects        integer          NOT NULL,
    cert_expires_at  timestamptz,
    legacy           boolean          NOT NULL DEFAULT false,
    kafka_topic      text             NOT NULL,
    kafka_partition  integer          NOT NULL,
    kafka_offset     bigint           NOT NULL,
    ingested_at      timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (result_id, checked_at)
) PARTITION BY RANGE (checked_at);

-- Reports read one task over a time range; load_time and ok ride along so the report is an
-- index-only scan on vacuumed partitions (insert-only tables are autovacuumed since PG 13).
CREATE INDEX IF NOT EXISTS check_results_task_time
    ON check_results (task_id, checked_at) INCLUDE (load_time, ok);

-- Partitions are named check_results_pYYYYMMDD; retention parses that name. Creation takes a
-- schema-wide advisory lock so two processors creating the same day do not race on the catalog.
CREATE OR REPLACE FUNCTION check_results_ensure_partition(day date) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('check_results_p%s', to_char(day, 'YYYYMMDD'));
BEGIN
    IF to_regclass(quote_ident(current_schema()) || '.' || part) IS NOT NULL THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext(current_schema() || '.check_results partitions'));
    IF to_regclass(quote_ident(current_schema()) || '.' || part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I.%I PARTITION OF check_results FOR VALUES FROM (%L) TO (%L)',
        current_schema(), part,
        (day::timestamp AT TIME ZONE 'UTC'),
        ((day + 1)::timestamp AT TIME ZONE 'UTC')
    );
    RETURN true;
END
$$;

-- The latest name, url and method of each task, and a pointer to its latest result.
CREATE TABLE IF NOT EXISTS tasks (
    task_id           uuid        PRIMARY KEY,
    name              text        NOT NULL,
    url               text        NOT NULL,
    method            text        NOT NULL,
    last_result_id    uuid        NOT NULL,
    last_checked_at   timestamptz NOT NULL,
    last_status_code  smallint,
    last_ok           boolean     NOT NULL,
    last_health       text        NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now()
);

-- One row per down period: opened by the first 'down' result, closed by the next 'up'.
CREATE TABLE IF NOT EXISTS incidents (
    incident_id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id              uuid        NOT NULL,
    started_at           timestamptz NOT NULL,
    ended_at             timestamptz,
    first_error_kind     text,
    first_error_message  text,
    opened_by            uuid        NOT NULL,
    closed_by            uuid,
    CHECK (ended_at IS NULL OR ended_at >= started_at)
);
-- At most one open incident per task, even with two processors on the same task.
CREATE UNIQUE INDEX IF NOT EXISTS incidents_one_open
    ON incidents (task_id) WHERE ended_at IS NULL;
CREATE INDEX IF NOT EXISTS incidents_task_time ON incidents (task_id, started_at);

-- Messages that could not be stored, kept with their raw bytes. Unique on the Kafka position so
-- a redelivered poison message is recorded once.
CREATE TABLE IF NOT EXISTS rejected_messages (
    rejected_id      bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kafka_topic      text        NOT NULL,
    kafka_partition  integer     NOT NULL,
    kafka_offset     bigint      NOT NULL,
    message_key      bytea,
    message_value    bytea,
    error            text        NOT NULL,
    rejected_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kafka_topic, kafka_partition, kafka_offset)
);
CREATE INDEX IF NOT EXISTS rejected_messages_time ON rejected_messages (rejected_at);

-- Reporting views. Filter them on task_id (pushed below the GROUP BY, uses the index); for
-- long ranges over many tasks prefer filtering check_results.checked_at directly (partition
-- pruning), as docs/queries.md and `checker-processing report` do.
CREATE OR REPLACE VIEW latest_results AS
SELECT r.*
FROM tasks t
JOIN check_results r ON r.result_id = t.last_result_id AND r.checked_at = t.last_checked_at;

CREATE OR REPLACE VIEW availability_hourly AS
SELECT task_id,
       date_trunc('hour', checked_at, 'UTC') AS hour,
       count(*) AS checks,
       count(*) FILTER (WHERE ok) AS successes,
       round(100.0 * count(*) FILTER (WHERE ok) / count(*), 3) AS uptime_percent,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY load_time) AS load_time_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY load_time) AS load_time_p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY load_time) AS load_time_p99
FROM check_results
GROUP BY task_id, date_trunc('hour', checked_at, 'UTC');

CREATE OR REPLACE VIEW availability_daily AS
SELECT task_id,
       (date_trunc('day', checked_at, 'UTC') AT TIME ZONE 'UTC')::date AS day,
       count(*) AS checks,
       count(*) FILTER (WHERE ok) AS successes,
       round(100.0 * count(*) FILTER (WHERE ok) / count(*), 3) AS uptime_percent,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY load_time) AS load_time_p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY load_time) AS load_time_p95,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY load_time) AS load_time_p99
FROM check_results
GROUP BY task_id, date_trunc('day', checked_at, 'UTC');
