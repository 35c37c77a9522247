-- A notification a maintenance window held back (README, "Maintenance windows"): its due_at is
-- the window's end. An incident that closes while its opening is held is told to nobody.
ALTER TABLE notifications ADD COLUMN IF NOT EXISTS held boolean NOT NULL DEFAULT false;
