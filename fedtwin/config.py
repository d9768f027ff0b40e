"""Load the Hydra configuration shipped in ``fedtwin.conf`` and apply overrides."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf


def load_config(overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved run config as a plain dict, e.g. ``load_config(["+experiment=tiny"])``."""
    with initialize_config_module(config_module="fedtwin.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides or []))
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def check_federation(cfg: Mapping[str, Any]) -> None:
    """Refuse settings that could never finish a round, before anything starts."""
    fed = cfg["federation"]
    if fed.get("secure_aggregation") and int(fed["hospitals"]) < 2:
        raise ValueError(
            f"federation.secure_aggregation=true needs at least 2 hospitals (SecAgg+ masks "
            f"each update with keys shared with the others), but federation.hospitals="
            f"{fed['hospitals']}; set federation.secure_aggregation=false for one hospital"
        )


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda, got {name!r}")
    return name


def config_from_run(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """A deployed run's config: ``overrides`` of the Flower run config (Hydra overrides as
    on the demo's command line, one string) applied to the shipped defaults."""
    overrides = shlex.split(str(run_config.get("overrides", "")))
    cfg = load_config(overrides)
    return {**cfg, "device_resolved": resolve_device(str(cfg.get("device", "auto")))}
