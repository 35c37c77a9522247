-- How an incident ended: 'recovered' (an 'up' result closed it; closed_by is that result) or
-- 'task_removed' (the task was removed while it was down: ended_at is the removal's time,
-- closed_by is NULL). NULL while the incident is open.
ALTER TABLE incidents
    ADD COLUMN IF NOT EXISTS end_reason text CHECK (end_reason IN ('recovered', 'task_removed'));

-- Every incident closed before this migration was closed by a result.
UPDATE incidents SET end_reason = 'recovered' WHERE ended_at IS NOT NULL AND end_reason IS NULL;
