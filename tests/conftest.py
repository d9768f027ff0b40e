"""Shared fixtures: the PneumoniaMNIST file beside the repository, small real subsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pneumoniamnist_28_trainval.npz"


@pytest.fixture(scope="session")
def data_path() -> Path:
    if not DATA.exists():
        pytest.skip(f"PneumoniaMNIST file not found at {DATA} (the shared data folder)")
    return DATA


@pytest.fixture(scope="session")
def small_real(data_path) -> tuple[np.ndarray, np.ndarray]:
    """The first 300 real training images ``(300, 28, 28)`` uint8 and labels ``(300,)``."""
    d = np.load(data_path)
    return d["train_images"][:300].copy(), d["train_labels"][:300, 0].astype(np.int64)
