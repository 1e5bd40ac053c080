"""Content hashes of plain data: the keys of run dirs, prepared data and cached models."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def stable_hash(obj: Any, length: int = 12) -> str:
    """Hex digest of a canonical JSON encoding of ``obj`` (sorted keys: equal content, equal hash)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]
