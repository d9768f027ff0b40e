"""The run config's schema: one dataclass per Hydra group, registered with Hydra's
ConfigStore as the base of that group's files (``conf/<group>/*.yaml`` start from it).

A key no schema has, or a value of the wrong type (``federation.rounds=many``), then fails
when the config is composed, before anything starts. What a type cannot express is in
``RANGES`` (every number's range) and ``CHOICES`` (the words a setting may be), at the end;
``fedtwin.config.check_config`` applies them, and the checks across settings. The values
themselves, and a comment on each, are in the YAML files.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fedtwin.ranges import SEED, Range, number, whole


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
    g_steps: int = MISSING
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
    ema: float = MISSING


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
    max_train_images: int = MISSING
    c2st_images: int = MISSING
    c2st_epochs: int = MISSING
    min_class_auc: float = MISSING
    max_c2st_auc: float = MISSING


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
    max_records: int = MISSING
    thresholds: AuditThresholds = field(default_factory=AuditThresholds)
    override: str | None = None
    canaries: int = MISSING
    canary_guesses: float = MISSING
    canary_side: str = MISSING


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


POSITIVE = number(0, low_open=True)  # any finite number > 0
LEARNING_RATE = number(0, 10, low_open=True)

# Every numeric setting's range, checked by fedtwin.config.check_config before anything
# starts, in this order. The bounds are far beyond any useful value; they are there so that
# a typo fails in one line now instead of in a MemoryError, a hang or Ray's tracebacks later.
# privacy.* apply only with DP on; a model.* key applies where the chosen model has it.
RANGES: dict[str, Range] = {
    "seed": SEED,
    "privacy.epsilon": number(0, 1000, low_open=True),
    "privacy.delta": number(0, 1, low_open=True, high_open=True),
    "privacy.max_grad_norm": number(0, 1e6, low_open=True),
    "privacy.label_noise": number(0, 1e6, low_open=True),  # exact counts would leak
    "privacy.feature_share": number(0, 1, low_open=True, high_open=True),
    "data.image_size": whole(8, 512),  # MedMNIST's largest is 224
    "federation.hospitals": whole(1, 1000),
    "federation.alpha": number(0, 1e6, low_open=True),
    "federation.holdout_fraction": number(0, 1, high_open=True),
    "federation.rounds": whole(1, 10_000),
    "federation.warm_start_steps": whole(0, 1_000_000),
    "federation.local_steps": whole(1, 1_000_000),
    "federation.batch_size": whole(1, 65_536),
    "federation.min_hospitals": whole(1, 1000),
    "federation.max_update_norm": POSITIVE,
    "federation.secagg.reconstruction_threshold": number(0, 1, low_open=True),
    "federation.secagg.clipping_range": number(0, 1e6, low_open=True),
    "federation.secagg.max_examples": whole(1, 10_000_000),
    "federation.secagg.timeout_s": number(0, 86_400, low_open=True, null=True),
    "twin.size": whole(1, 1_000_000),
    "twin.checkpoints": whole(1, 10_000),
    "eval.seeds": replace(SEED, each=True),
    "eval.epochs": whole(1, 10_000),
    "eval.batch_size": whole(1, 65_536),
    "eval.lr": LEARNING_RATE,
    "eval.feature_epochs": whole(1, 10_000),
    "eval.max_train_images": whole(1, 100_000_000),
    "eval.c2st_images": whole(1, 1_000_000),
    "eval.c2st_epochs": whole(1, 10_000),
    "eval.min_class_auc": number(0, 1),
    "eval.max_c2st_auc": number(0, 1),
    "audit.copy_margin": number(0, 0.5, low_open=True),  # what fedtwin.audit accepts
    "audit.copy_coarse": whole(1, 512),
    "audit.density_k": whole(1, 1000),
    "audit.bins": whole(2, 100_000),
    "audit.max_records": whole(0, 1_000_000_000),  # 0 = every record
    "audit.thresholds.max_near_copies": whole(0, 1_000_000_000),
    "audit.thresholds.record_ratio": number(0, 1e6, low_open=True),
    "audit.thresholds.mia_auc_max": number(0, 1),
    "audit.thresholds.dcr_ratio_min": number(0),
    "audit.thresholds.closer_to_train_max": number(0, 1),
    "audit.canaries": whole(0, 100_000),  # per hospital; 0 = off
    "audit.canary_guesses": number(0, 1, low_open=True),
    "model.max_grad_norm": number(0, 1e6, low_open=True),
    "model.latent_dim": whole(1, 4096),
    "model.g_width": whole(1, 1024),
    "model.d_width": whole(1, 1024, null=True),
    "model.d_steps": whole(1, 100),
    "model.g_steps": whole(1, 100),
    "model.aux_weight": number(0, 1e6),
    "model.smoothness": number(0, 1e6),
    "model.mode_seeking": number(0, 1e6),
    "model.lr_g": LEARNING_RATE,
    "model.lr_d": LEARNING_RATE,
    "model.lr": LEARNING_RATE,
    "model.beta1": number(0, 1, high_open=True),
    "model.beta2": number(0, 1, high_open=True),
    "model.anchor": number(0, 1e6),
    "model.warm_start_batch": whole(1, 65_536),
    "model.warm_start_lr": LEARNING_RATE,
    "model.ema": number(0, 1, high_open=True),
    "model.width": whole(1, 1024),
    "model.timesteps": whole(2, 100_000),
    "model.sample_steps": whole(1, 100_000),
    "model.guidance": number(0, 100),
    "model.p_uncond": number(0, 1, high_open=True),
    "model.noise_multiplicity": whole(1, 1024),
    "model.max_physical_batch": whole(1, 65_536),
    "model.features.features": whole(1, 1_000_000),
    "model.features.scales": whole(1, 512, each=True),
    "model.features.bandwidth": number(0, 1e6, low_open=True),
    "model.features.seed": SEED,
    "model.features.patch": whole(0, 512),
    "model.features.patch_features": whole(2, 1_000_000),
    "model.features.patch_stride": whole(1, 512),
}

# The settings that name one of a few choices (privacy.enabled and other booleans: their type).
CHOICES: dict[str, tuple] = {
    "device": ("auto", "cpu", "cuda"),
    "privacy.accountant": ("rdp", "prv"),  # the Opacus accountants fedtwin plans with
    "data.channels": (1, 3),  # grey or RGB
    "federation.partition": ("iid", "dirichlet"),
    "twin.label_mix": ("federation", "balanced"),
    "audit.canary_side": ("out", "in", "both"),  # fedtwin.canaries.guess
    "model.conditioning": ("aux", "planes"),  # fedtwin.models.dcgan
    "model.upsample": ("nearest", "bilinear", "transposed"),  # fedtwin.models.dcgan
    "model.prediction": ("eps", "v"),  # fedtwin.models.ddpm
}
