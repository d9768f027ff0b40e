"""What fedtwin keeps on disk because it can be recomputed but is slow to: downloaded
datasets (``fedtwin.medmnist``) and calibrated noise levels (``fedtwin.privacy``).

Calibrating a hospital's noise takes a bisection over Opacus accountants: seconds of CPU.
In a deployment every Flower message starts a fresh ClientApp process, so an in-process
cache never hits and each round would calibrate again; :func:`remembered` keeps the answer
in one small file per question, keyed by the question, the code that answers it and the
Opacus version. It changes nothing about what is spent: the noise a round uses is recorded
in the hospital's ledger and epsilon is always recomputed from the ledger. A stored value
is a hint, not the truth: one that is not a finite number, or that the function's own
check (``valid``) refuses, is computed again and overwritten. A cache that cannot be read
or written is ignored (the value is computed again).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir(configured: str | None = None) -> Path:
    """Where downloads live: ``configured``, else ``$FEDTWIN_CACHE``, else ~/.cache/fedtwin."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("FEDTWIN_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fedtwin"


def remembered(
    version: str, valid: Callable[..., bool] | None = None
) -> Callable[[Callable[..., float]], Callable[..., float]]:
    """Keep a pure function's float results under ``cache_dir()/computed``. ``version``
    names everything the answer depends on besides the arguments (the code, the library);
    arguments must be JSON-serialisable (numbers, strings, tuples). ``valid(value, *args,
    **kwargs)`` says whether a stored value still answers the question (a file anyone can
    write is no proof); a value it refuses, or that raises ValueError, is computed again."""

    def wrap(fn: Callable[..., float]) -> Callable[..., float]:
        @functools.wraps(fn)
        def cached(*args: Any, **kwargs: Any) -> float:
            question = json.dumps([fn.__qualname__, version, args, sorted(kwargs.items())])
            name = hashlib.sha256(question.encode()).hexdigest()
            path = cache_dir() / "computed" / f"{name}.json"
            stored = _read(path)
            if stored is not None and _holds(valid, stored, args, kwargs):
                return stored
            value = fn(*args, **kwargs)
            _write(path, question, value)
            return value

        return cached

    return wrap


def _read(path: Path) -> float | None:
    """The finite number stored at ``path``; None if there is none."""
    try:
        value = float(json.loads(path.read_text())["value"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if math.isfinite(value) else None


def _holds(valid: Callable[..., bool] | None, value: float, args: tuple, kwargs: dict) -> bool:
    if valid is None:
        return True
    try:
        return bool(valid(value, *args, **kwargs))
    except ValueError:
        return False


def _write(path: Path, question: str, value: float) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
            json.dump({"question": question, "value": value}, f)
        os.replace(f.name, path)  # whole or not at all, whoever writes at once
    except OSError:
        pass
