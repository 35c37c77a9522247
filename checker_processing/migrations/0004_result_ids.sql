-- A result id is stored once, whatever its timestamp says.
--
-- check_results is partitioned by day, and PostgreSQL enforces uniqueness on a partitioned table
-- only for keys that hold the partition key: its primary key is (result_id, checked_at), so a
-- copy of a result whose timestamp differs from the stored one (a checker that stamps a result
-- again, or any producer that reuses an id) would be a second row. This table holds every
-- stored result's id and check time, unpartitioned, and the writer inserts into it in the same
-- transaction as the rows: its primary key is the rule. A copy with the same check time is a
-- redelivery (counted as a duplicate); one with another check time goes to rejected_messages
-- naming the stored time.
--
-- The price is a second index entry per row (measured in BENCHMARKS.md, "Ingest"), and this
-- table is trimmed by DELETE rather than by dropping a partition: retention deletes the ids
-- older than the first kept day (rows arrive roughly in check-time order, so a BRIN index finds
-- them at a small fraction of a B-tree's upkeep).
CREATE TABLE IF NOT EXISTS result_ids (
    result_id   uuid        PRIMARY KEY,
    checked_at  timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS result_ids_checked_at
    ON result_ids USING brin (checked_at) WITH (autosummarize = on);

-- The rows stored before this migration; where an id is stored twice already, the first.
INSERT INTO result_ids (result_id, checked_at)
SELECT DISTINCT ON (result_id) result_id, checked_at
FROM check_results
ORDER BY result_id, checked_at
ON CONFLICT DO NOTHING;
