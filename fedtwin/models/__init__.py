"""Generators that fedtwin can train; ``build_model`` picks one from the ``model`` config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedtwin.models import ddpm
from fedtwin.models.base import DPTrainable, TwinGenerator
from fedtwin.models.dcgan import DCGAN, DCGANConfig, halvings
from fedtwin.models.ddpm import DDPM, DDPMConfig

__all__ = ["DPTrainable", "TwinGenerator", "DCGAN", "DCGANConfig", "DDPM", "DDPMConfig"]
__all__ += ["build_model", "check_image_size", "model_from_config"]

GENERATORS = {"dcgan": (DCGAN, DCGANConfig), "ddpm": (DDPM, DDPMConfig)}
# each generator's check of the image sizes it can make (the halvings of its network)
IMAGE_SIZE_RULES = {"dcgan": halvings, "ddpm": ddpm.check_image_size}


def check_image_size(name: str, image_size: int) -> None:
    """ValueError naming ``data.image_size`` when generator ``name`` cannot make images of
    that size (an unknown name is ``build_model``'s to refuse)."""
    rule = IMAGE_SIZE_RULES.get(name)
    if rule is not None:
        rule(image_size)


def build_model(
    model_cfg: Mapping[str, Any], n_classes: int, image_size: int, channels: int = 1
) -> TwinGenerator:
    """Build the generator named by ``model.name`` for images of ``channels`` x
    ``image_size`` x ``image_size`` in ``n_classes`` classes."""
    name = model_cfg.get("name")
    if name not in GENERATORS:
        raise ValueError(
            f"model.name: unknown generator {name!r}; available: {', '.join(GENERATORS)}"
        )
    model_class, config_class = GENERATORS[name]
    # max_grad_norm is the generator's DP clipping bound: the privacy plan reads it (through
    # privacy.max_grad_norm), the network does not.
    fields = {k: v for k, v in model_cfg.items() if k not in ("name", "max_grad_norm")}
    try:
        config = config_class(
            n_classes=n_classes, image_size=image_size, channels=channels, **fields
        )
    except TypeError as e:
        raise ValueError(f"model ({name}): {e}") from None
    return model_class(config)


def model_from_config(cfg: Mapping[str, Any]) -> TwinGenerator:
    """The generator of a resolved run config: ``model.*`` for images as ``data.*`` has them."""
    data = cfg["data"]
    return build_model(
        cfg["model"], len(data["classes"]), int(data["image_size"]), int(data.get("channels", 1))
    )
