"""Reading what a command printed."""
from __future__ import annotations

import json


def last_json(stdout: str):
    """The last line of `stdout` that is a JSON object or list. Ray's log monitor may print its own lines (raylet
    warnings, repeated-message notes) after a command's summary, so "the last line" is not enough."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith(("{", "[")):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise AssertionError(f"no JSON object or list in the output: {stdout[-2000:]!r}")
