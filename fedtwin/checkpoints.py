"""The server's record of a federation on disk: one checkpoint of the global model per
round that made one (``checkpoints/round-NNN.pt``) and the per-round history
(``history.json``), both written atomically, so that a crash never loses a completed round
and a restarted server resumes from the last one."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedtwin.jsonio import write_json


def save_checkpoint(
    out: Path, server_round: int, weights: Mapping[str, np.ndarray], rounds: list[dict]
) -> Path:
    """Write ``checkpoints/round-NNN.pt`` and ``history.json`` atomically (temp + rename)."""
    path = checkpoint_path(out, server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    _atomic(path, lambda p: torch.save({"round": server_round, "weights": tensors}, p))
    write_json(out / "history.json", {"rounds": rounds})
    return path


def checkpoint_path(out: Path, server_round: int) -> Path:
    return Path(out) / "checkpoints" / f"round-{server_round:03d}.pt"


def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((Path(out) / "checkpoints").glob("round-*.pt"))
    return found[-1] if found else None


def load_checkpoint(out: Path) -> tuple[int, dict[str, np.ndarray], list[dict]] | None:
    """The last completed round in ``out``: (round, global weights, round records up to
    it), or None before the first round."""
    path = latest_checkpoint(out)
    if path is None:
        return None
    done, weights = _read_checkpoint(path)
    return done, weights, [r for r in read_history(out) if r["round"] <= done]


def recent_global_models(out: Path, history: list[dict], n: int) -> list[tuple[int, dict]]:
    """The global models of the last ``n`` training rounds in ``history`` that made one (a
    hospital trained in it), oldest first, as (round, weights) from ``out/checkpoints``.
    Checkpoints of rounds outside ``history`` (another run's, in a reused folder) are
    never read."""
    if n < 1:
        raise ValueError(f"twin.checkpoints: expected 1 or more rounds, got {n}")
    # round 0 is the feature release (no training), not a generator the GAN made
    made = sorted({int(e["round"]) for e in history if e["hospitals"] and e["round"] > 0})
    models = []
    for rnd in made[-n:]:
        path = checkpoint_path(out, rnd)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: round {rnd} made a global model, but its checkpoint is "
                f"gone; restore it or set twin.checkpoints=1"
            )
        models.append(_read_checkpoint(path))
    return models


def _read_checkpoint(path: Path) -> tuple[int, dict[str, np.ndarray]]:
    saved = torch.load(path, weights_only=True)
    return int(saved["round"]), {k: v.numpy() for k, v in saved["weights"].items()}


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def read_history(out: Path) -> list[dict]:
    """Per-round records written by ``save_checkpoint`` (empty before the first round)."""
    path = Path(out) / "history.json"
    return json.loads(path.read_text())["rounds"] if path.exists() else []
