-- Alerting's outbox (README, "Alerting"; checker_processing/alerting).
--
-- alert_events: one row per incident that opened and per incident that closed, written by a
-- trigger in the same transaction as the incident change (whichever statement makes it: a
-- result, a span within one batch, a task's removal). Unique per (incident, kind): an
-- incident opens and closes once, so a redelivered result, which changes no incident, writes
-- no event either. The sender turns each event into notifications and sets expanded_at.
CREATE TABLE IF NOT EXISTS alert_events (
    event_id     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    incident_id  bigint      NOT NULL,
    task_id      uuid        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('opened', 'closed')),
    at           timestamptz NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expanded_at  timestamptz,
    UNIQUE (incident_id, kind)
);
CREATE INDEX IF NOT EXISTS alert_events_waiting ON alert_events (event_id)
    WHERE expanded_at IS NULL;

CREATE OR REPLACE FUNCTION alert_events_of_incident() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO alert_events (incident_id, task_id, kind, at)
        VALUES (NEW.incident_id, NEW.task_id, 'opened', NEW.started_at)
        ON CONFLICT DO NOTHING;
    END IF;
    IF NEW.ended_at IS NOT NULL AND (TG_OP = 'INSERT' OR OLD.ended_at IS NULL) THEN
        INSERT INTO alert_events (incident_id, task_id, kind, at)
        VALUES (NEW.incident_id, NEW.task_id, 'closed', NEW.ended_at)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS incidents_alert_events ON incidents;
CREATE TRIGGER incidents_alert_events
    AFTER INSERT OR UPDATE OF ended_at ON incidents
    FOR EACH ROW EXECUTE FUNCTION alert_events_of_incident();

-- notifications: what one channel is told about one incident change. notification_id is
-- stable (a UUIDv5 of incident, kind, channel and sequence): made again, it is the same row,
-- and receivers can drop repeats by it. state: pending (due at due_at; moved on by each
-- failed try), sent, failed (gave up: last_error says why), cancelled (not due before the
-- incident closed, or a reminder of a closed incident).
CREATE TABLE IF NOT EXISTS notifications (
    notification_id  uuid        PRIMARY KEY,
    incident_id      bigint      NOT NULL,
    task_id          uuid        NOT NULL,
    channel          text        NOT NULL,
    rule             text        NOT NULL,
    kind             text        NOT NULL CHECK (kind IN ('opened', 'reminder', 'closed')),
    sequence         integer     NOT NULL DEFAULT 0,
    details          jsonb       NOT NULL,
    first_due_at     timestamptz NOT NULL,
    due_at           timestamptz NOT NULL,
    state            text        NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'sent', 'failed', 'cancelled')),
    attempts         integer     NOT NULL DEFAULT 0,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications (due_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS notifications_incident ON notifications (incident_id, channel);
