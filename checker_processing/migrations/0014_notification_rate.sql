-- A rate limit per channel (README, "Rate limit and summary"; checker_processing/alerting/rate.py).
--
-- notification_windows: what each channel spent of its budget in one minute (by the database's
-- clock): individual notifications tried, and the summary tried, if any. A sender locks its
-- channel's row of the current minute before it sends there and holds it until its round
-- commits, so senders of several processors share one budget. Kept a day.
CREATE TABLE IF NOT EXISTS notification_windows (
    channel       text        NOT NULL,
    window_start  timestamptz NOT NULL,
    sent          integer     NOT NULL DEFAULT 0,
    summary_id    uuid,
    PRIMARY KEY (channel, window_start)
);

-- A notification folded into a summary is `summarised`, with the summary's id: it was told,
-- in the summary, and is not sent on its own.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS summary_id uuid;
ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_state_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_state_check
    CHECK (state IN ('pending', 'sent', 'failed', 'cancelled', 'summarised'));
CREATE INDEX IF NOT EXISTS notifications_summary ON notifications (summary_id)
    WHERE summary_id IS NOT NULL;
