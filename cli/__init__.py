"""Console entry points (see pyproject.toml [project.scripts]); each prints one JSON summary line last."""

import json
import sys


def emit_json(record: dict) -> None:
    """The final machine-readable line every command ends with."""
    print(json.dumps(record), flush=True)
    sys.stdout.flush()
