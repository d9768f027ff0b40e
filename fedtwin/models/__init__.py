"""Generators that fedtwin can train; ``build_model`` picks one from the ``model`` config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedtwin.models.base import DPTrainable, TwinGenerator
from fedtwin.models.dcgan import DCGAN, DCGANConfig

__all__ = ["DPTrainable", "TwinGenerator", "DCGAN", "DCGANConfig", "build_model"]


def build_model(model_cfg: Mapping[str, Any], n_classes: int, image_size: int) -> TwinGenerator:
    """Build the generator named by ``model.name`` with the given number of classes."""
    name = model_cfg.get("name")
    if name == "dcgan":
        fields = {k: v for k, v in model_cfg.items() if k != "name"}
        return DCGAN(DCGANConfig(n_classes=n_classes, image_size=image_size, **fields))
    raise ValueError(f"model.name: unknown generator {name!r}; available: dcgan")
