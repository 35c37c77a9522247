-- A task's tags (TaskSpec.tags), as its task record gives them: the labels alerting rules
-- select tasks by. Empty for a task no record has set, or whose record does not validate.
ALTER TABLE tasks ADD COLUMN IF NOT EXISTS tags text[] NOT NULL DEFAULT '{}';
CREATE INDEX IF NOT EXISTS tasks_tags ON tasks USING gin (tags);
