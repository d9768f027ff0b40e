"""JSON that stays standard (no NaN/Infinity tokens) and files written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def plain(value: Any) -> Any:
    """Numpy scalars/arrays to Python; inf/nan to the strings "inf"/"nan" (epsilon = inf)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def dumps(value: Any) -> str:
    return json.dumps(plain(value), indent=2, allow_nan=False) + "\n"


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` as JSON to ``path`` via a temp file and rename (never half written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(value))
    os.replace(tmp, path)
    return path
