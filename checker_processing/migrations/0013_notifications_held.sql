-- A notification a maintenance window held back (README, "Maintenance windows"): its due_at is
-- the window's end. An incident that closes while its opening is held is told to nobody.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS held boolean NOT NULL DEFAULT false;

-- A task that flaps is reported once as flapping (README, "Flapping"): a kind of its own.
ALTER TABLE notifications DROP CONSTRAINT IF EXISTS notifications_kind_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_kind_check
    CHECK (kind IN ('opened', 'reminder', 'closed', 'flapping'));
