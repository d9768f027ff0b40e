"""The run config's schema: one dataclass per Hydra group, registered with Hydra's
ConfigStore as the base of that group's files (``conf/<group>/*.yaml`` start from it).

A key no schema has, or a value of the wrong type (``federation.rounds=many``), then fails
when the config is composed, before anything starts; ``fedtwin.config.check_config`` adds
the checks of range and consistency a type cannot express. The values themselves, and a
comment on each, are in the YAML files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    path: str | None = None
    cache_dir: str | None = None
    image_size: int = MISSING
    classes: list[str] = MISSING
    channels: int = 1
    task: str = "multi-class"
    sources: dict[int, dict[str, str]] = field(default_factory=dict)  # size -> {url, md5}


@dataclass
class FeaturesConfig:
    features: int = MISSING
    scales: list[int] = MISSING
    bandwidth: float = MISSING
    seed: int = MISSING
    patch: int = MISSING
    patch_features: int = MISSING
    patch_stride: int = MISSING


@dataclass
class DCGANConfig:
    name: str = MISSING
    max_grad_norm: float = MISSING
    latent_dim: int = MISSING
    g_width: int = MISSING
    d_width: int | None = None  # None: by image size (fedtwin.models.dcgan.d_width_for)
    d_steps: int = MISSING
    conditioning: str = MISSING
    aux_weight: float = MISSING
    class_balance: bool = MISSING
    upsample: str = MISSING
    smoothness: float = MISSING
    mode_seeking: float = MISSING
    lr_g: float = MISSING
    lr_d: float = MISSING
    beta1: float = MISSING
    beta2: float = MISSING
    features: FeaturesConfig | None = None
    anchor: float = MISSING
    warm_start_batch: int = MISSING
    warm_start_lr: float = MISSING


@dataclass
class DDPMConfig:
    name: str = MISSING
    max_grad_norm: float = MISSING
    width: int = MISSING
    timesteps: int = MISSING
    sample_steps: int = MISSING
    guidance: float = MISSING
    p_uncond: float = MISSING
    noise_multiplicity: int = MISSING
    prediction: str = MISSING
    lr: float = MISSING
    beta1: float = MISSING
    beta2: float = MISSING
    max_physical_batch: int = MISSING


@dataclass
class PrivacyConfig:
    enabled: bool = MISSING
    epsilon: float = MISSING
    delta: float = MISSING
    max_grad_norm: float = MISSING
    label_noise: float = MISSING
    feature_share: float = MISSING
    accountant: str = MISSING


@dataclass
class SecAggConfig:
    reconstruction_threshold: float = MISSING
    clipping_range: float = MISSING
    max_examples: int = MISSING
    timeout_s: float | None = None


@dataclass
class FederationConfig:
    hospitals: int = MISSING
    partition: str = MISSING
    alpha: float = MISSING
    holdout_fraction: float = MISSING
    rounds: int = MISSING
    warm_start_steps: int = MISSING
    local_steps: int = MISSING
    batch_size: int = MISSING
    min_hospitals: int = MISSING
    max_update_norm: float = MISSING
    secure_aggregation: bool = MISSING
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    resume: bool = MISSING


@dataclass
class TwinConfig:
    size: int = MISSING
    checkpoints: int = MISSING
    label_mix: str = MISSING
    class_weights: dict[str, float] = field(default_factory=dict)  # class name -> weight
    dicom: bool = MISSING
    signing_key: str | None = None


@dataclass
class EvalConfig:
    seeds: list[int] = MISSING
    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    hybrid: bool = MISSING
    feature_epochs: int = MISSING


@dataclass
class AuditThresholds:
    max_near_copies: int = MISSING
    record_ratio: float = MISSING
    mia_auc_max: float = MISSING
    dcr_ratio_min: float = MISSING
    closer_to_train_max: float = MISSING


@dataclass
class AuditConfig:
    copy_margin: float = MISSING
    copy_coarse: int = MISSING
    density_k: int = MISSING
    bins: int = MISSING
    thresholds: AuditThresholds = field(default_factory=AuditThresholds)
    override: str | None = None


# group -> (schema name, as the group's YAML files name it in their defaults, dataclass)
SCHEMAS = {
    "data": ("data_schema", DataConfig),
    "model": ("dcgan_schema", DCGANConfig),
    "privacy": ("privacy_schema", PrivacyConfig),
    "federation": ("federation_schema", FederationConfig),
    "twin": ("twin_schema", TwinConfig),
    "eval": ("eval_schema", EvalConfig),
    "audit": ("audit_schema", AuditConfig),
}


def register() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    for group, (name, node) in SCHEMAS.items():
        store.store(group=group, name=name, node=node)
    store.store(group="model", name="ddpm_schema", node=DDPMConfig)
