"""Names that become path components (run dirs, cached models, data dirs) are checked before any directory is
made: a name is never a path, so no config value can write outside ``paths.*``."""

from __future__ import annotations

import re
from typing import Any

from .errors import ConfigError

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=,+-]*$")
MAX_NAME = 100


def check_name(value: Any, key: str) -> str:
    """``value`` as a path component, or ConfigError naming ``key``: letters, digits and ``. _ = , + -``,
    starting with a letter or digit, no ``..``, at most MAX_NAME characters."""
    text = str(value)
    if not SAFE_NAME.fullmatch(text) or ".." in text or len(text) > MAX_NAME:
        raise ConfigError(
            f"{key}={value!r} is used in file names: use letters, digits and . _ = , + - (starting with a letter "
            f"or digit, no '..', at most {MAX_NAME} characters)"
        )
    return text


def check_seed(value: Any, key: str = "seed") -> int:
    """``value`` as a seed: a non-negative integer below 2**32 (what every generator accepts)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise ConfigError(f"{key}={value!r}: use an integer seed in [0, 2**32)")
    return value


def safe_label(text: str) -> str:
    """``text`` (e.g. read from a metrics.json) made into a file-name part: unsafe characters become ``_``."""
    label = re.sub(r"[^A-Za-z0-9._=,+-]", "_", str(text)).replace("..", "_")
    return label.lstrip(".-_") or "_"
