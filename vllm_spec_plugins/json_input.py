"""User-supplied JSON objects (command-line flags, JSONL lines): one parser,
one error shape: ``<where>: invalid JSON (...)`` / ``expected a JSON object``."""

from __future__ import annotations

import json
from typing import Any


def parse_json_object(text: str, where: str) -> dict[str, Any]:
    """``text`` as a JSON object, or ValueError naming ``where`` and the problem."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj
