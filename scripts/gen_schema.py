"""Write the result message's JSON Schema, generated from the contract model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from checker_common.contract import json_schema

TARGET = Path(__file__).resolve().parent.parent / "schema" / "result-message.schema.json"


def render() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    TARGET.write_text(render())
    print(f"wrote {TARGET}", file=sys.stderr)
