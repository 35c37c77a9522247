"""Write the JSON Schemas generated from their models: the result message
(checker_common/contract.py), the task record (checker_common/task_record.py) and the webhook
notification (checker_processing/alerting/message.py)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from checker_common import contract, task_record
from checker_processing.alerting import message

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schema"
TARGET = SCHEMA_DIR / "result-message.schema.json"
SCHEMAS: dict[Path, Callable[[], dict[str, Any]]] = {
    TARGET: contract.json_schema,
    SCHEMA_DIR / "task-record.schema.json": task_record.json_schema,
    SCHEMA_DIR / "notification.schema.json": message.json_schema,
}


def render(make: Callable[[], dict[str, Any]] = contract.json_schema) -> str:
    return json.dumps(make(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    for target, make in SCHEMAS.items():
        target.write_text(render(make))
        print(f"wrote {target}", file=sys.stderr)
