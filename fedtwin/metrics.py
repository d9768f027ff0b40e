"""How useful and how faithful a twin is, measured on real held-out data.

- TSTR (train on synthetic, test on real): a small CNN trained only on the twin, scored on
  the real val split. TRTR: the same CNN trained on the real training images, same run.
- Fréchet distance between Gaussians fitted to features of the penultimate layer of a CNN
  trained on real training images. Not Inception FID: Inception features say little about
  28 x 28 chest X-rays. Its floor is the distance between real train and real val.
- Precision, recall, density and coverage (``fedtwin.manifold``) in the same features,
  against val, with real train against val as the ceiling. Coverage is what shows collapse.
  These features keep what separates the classes and little else: they cannot see whether
  an image looks real. ``fedtwin.realism`` measures that.

Images are uint8 ``(N, H, W)``; labels int ``(N,)``.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from fedtwin.manifold import manifold_report, subsample
from fedtwin.tensors import channels_of, to_tensor

Data = tuple[np.ndarray, np.ndarray]  # images uint8 (N, H, W), labels (N,)

FEATURE_SPACE = (
    "penultimate layer (64 features) of a small CNN trained on the real train split; "
    "not Inception FID"
)


class Classifier(nn.Module):
    """``(N, C, S, S)`` in [-1, 1] -> logits ``(N, n_classes)``; GroupNorm, so Opacus takes it."""

    def __init__(self, n_classes: int, channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GroupNorm(8, 64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, S, S)`` -> ``(N, 64)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _shift(x: torch.Tensor, rng: torch.Generator, pixels: int = 2) -> torch.Tensor:
    """Random translation by up to ``pixels`` (one shift per batch): light augmentation."""
    dx, dy = (int(v) for v in torch.randint(-pixels, pixels + 1, (2,), generator=rng))
    padded = F.pad(x, (pixels, pixels, pixels, pixels), mode="replicate")
    h, w = x.shape[2:]
    return padded[:, :, pixels + dy : pixels + dy + h, pixels + dx : pixels + dx + w]


def train_classifier(
    images: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = False,
    desc: str = "classifier",
    start: Classifier | None = None,
) -> Classifier:
    """Adam on class-balanced cross-entropy (classes absent from ``labels`` weigh 0), from
    fresh weights or from a copy of ``start``'s (which is left as it is)."""
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    model = Classifier(n_classes, channels_of(images))
    if start is not None:
        model.load_state_dict(start.state_dict())
    x, y = to_tensor(images), torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(y, minlength=n_classes).float()
    weight = torch.where(counts > 0, len(y) / (n_classes * counts.clamp(min=1)), 0.0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        order = torch.randperm(len(y), generator=rng)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(_shift(x[idx], rng)), y[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


def classifier_from_config(
    images: np.ndarray, labels: np.ndarray, n_classes: int, eval_cfg: Mapping, seed: int, **options
) -> Classifier:
    """``train_classifier`` with the recipe of ``eval.*`` (epochs, batch size, lr) on at
    most ``eval.max_train_images`` of the images (``capped``); ``options``: its
    ``progress``, ``desc`` and ``start``."""
    images, labels = capped(images, labels, eval_cfg, seed)
    return train_classifier(
        images,
        labels,
        n_classes,
        epochs=int(eval_cfg["epochs"]),
        batch_size=int(eval_cfg["batch_size"]),
        lr=float(eval_cfg["lr"]),
        seed=seed,
        **options,
    )


def hybrid_classifier(
    start: Classifier, own: Data, twin: Data, n_classes: int, eval_cfg: Mapping, seed: int
) -> Classifier:
    """A hospital's classifier with the twin: the twin's classifier (``start``, trained on
    the whole twin) fine-tuned with the recipe of ``eval.*`` on the hospital's own images
    mixed with as many twin images (each half a seeded random subset, the two together at
    most ``eval.max_train_images``). The twin's half keeps the classifier from drifting to
    the hospital's own label mix; the cost grows with the hospital's images, not with the
    twin's size. Pretrain on synthetic, fine-tune on real: the way a hospital would use a
    twin it is handed."""
    n = min(len(own[1]), int(eval_cfg["max_train_images"]) // 2)
    mine, pick = subsample(len(own[1]), n, seed), subsample(len(twin[1]), n, seed)
    return classifier_from_config(  # 2n images: within the cap, so none is dropped
        np.concatenate([own[0][mine], twin[0][pick]]),
        np.concatenate([own[1][mine], twin[1][pick].astype(own[1].dtype)]),
        n_classes,
        eval_cfg,
        seed,
        start=start,
    )


def capped(images: np.ndarray, labels: np.ndarray, eval_cfg: Mapping, seed: int) -> Data:
    """At most ``eval.max_train_images`` of the images (a random subset drawn from ``seed``),
    so that an evaluation classifier's cost stays bounded as archives grow."""
    idx = subsample(len(labels), int(eval_cfg["max_train_images"]), seed)
    return (images, labels) if len(idx) == len(labels) else (images[idx], labels[idx])


TWIN_CLASSIFIER = "twin-classifier.pt"  # beside the twin, outside its signed files


def recipe(images: np.ndarray, labels: np.ndarray, eval_cfg: Mapping, seed: int) -> dict:
    """What makes a ``classifier_from_config`` model: the data (a digest) and the recipe."""
    data = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    data.update(np.asarray(labels, np.int64).tobytes())
    keys = ("epochs", "batch_size", "lr", "max_train_images")
    return {"data": data.hexdigest(), "seed": int(seed), **{k: str(eval_cfg[k]) for k in keys}}


def save_classifier(path: Path, model: Classifier, made_by: dict) -> None:
    """Keep a trained classifier with the ``recipe`` that made it."""
    torch.save({"recipe": made_by, "state": model.state_dict()}, path)


def load_classifier(path: Path, made_by: dict, n_classes: int, channels: int) -> Classifier | None:
    """The classifier saved at ``path`` if ``recipe`` made it (same data, recipe and seed),
    else None: a missing, stale or unreadable file is trained again, never trusted."""
    try:
        saved = torch.load(path, weights_only=True)
        if saved["recipe"] != made_by:
            return None
        model = Classifier(n_classes, channels)
        model.load_state_dict(saved["state"])
    except (OSError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError):
        return None
    return model.eval()


@torch.no_grad()
def _batched(fn, images: np.ndarray, batch: int) -> torch.Tensor:
    x = to_tensor(images)
    return torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def predict_proba(model: Classifier, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """uint8 ``(N, H, W)`` -> class probabilities ``(N, n_classes)``."""
    model.eval()
    return _batched(lambda x: F.softmax(model(x), 1), images, batch).numpy()


def predict_log_odds(model: Classifier, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """uint8 ``(N, H, W)`` -> ``log p(c) - log(1 - p(c))`` per class ``(N, n_classes)``, from
    the logits, so it stays exact where probabilities round to 0 or 1."""
    model.eval()

    def odds(x):
        logp = F.log_softmax(model(x).double(), 1)
        k = logp.shape[1]
        others = torch.stack(
            [torch.logsumexp(logp[:, [j for j in range(k) if j != c]], 1) for c in range(k)], 1
        )
        return logp - others

    return _batched(odds, images, batch).numpy()


def features(model: Classifier, images: np.ndarray, batch: int = 512) -> np.ndarray:
    """uint8 ``(N, H, W)`` -> penultimate features ``(N, 64)`` float64."""
    model.eval()
    return _batched(model.features, images, batch).double().numpy()


def classification_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC (binary: of class 1; else one-vs-rest macro) and accuracy of ``probs (N, K)``."""
    if probs.shape[1] == 2:
        auc = roc_auc_score(labels, probs[:, 1])
    else:
        auc = roc_auc_score(labels, probs, multi_class="ovr", labels=list(range(probs.shape[1])))
    return {"auc": float(auc), "acc": float(np.mean(probs.argmax(1) == labels))}


def _summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    aucs = [r["auc"] for r in per_seed]
    accs = [r["acc"] for r in per_seed]
    return {
        "auc_mean": float(np.mean(aucs)),
        "auc_std": float(np.std(aucs)),
        "acc_mean": float(np.mean(accs)),
        "acc_std": float(np.std(accs)),
        "per_seed": per_seed,
    }


def tstr_trtr(
    twin: Data,
    real_train: Data,
    val: Data,
    eval_cfg: Mapping,
    n_classes: int,
    progress=False,
    twin_classifiers: Mapping[int, Classifier] | None = None,
) -> dict[str, Any]:
    """TSTR and TRTR over ``eval_cfg.seeds``: the same classifier, recipe and val split.
    ``twin_classifiers``: seed -> a classifier already trained on this twin with this recipe
    and seed (the server's twin classifier); TSTR scores it rather than train it again."""
    out = {}
    trained = dict(twin_classifiers or {})
    for name, (images, labels) in (("tstr", twin), ("trtr", real_train)):
        runs = []
        for seed in eval_cfg["seeds"]:
            model = trained.get(int(seed)) if name == "tstr" else None
            reused = model is not None
            if model is None:
                model = classifier_from_config(
                    images, labels, n_classes, eval_cfg, int(seed),
                    progress=progress, desc=f"{name.upper()} seed {seed}",
                )  # fmt: skip
            scores = classification_scores(predict_proba(model, val[0]), val[1])
            runs.append({"seed": int(seed), **scores, "reused": reused})
        used = min(len(labels), int(eval_cfg["max_train_images"]))
        out[name] = _summarise(runs) | {"train_images": used, "of": len(labels)}
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to ``a (N, D)`` and ``b (M, D)``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    # a tiny ridge keeps sqrtm stable when some features are constant (dead ReLUs)
    ridge = 1e-6 * np.eye(a.shape[1])
    cov_a, cov_b = np.cov(a, rowvar=False) + ridge, np.cov(b, rowvar=False) + ridge
    root = linalg.sqrtm(cov_a @ cov_b)
    root = np.real(root)  # numerical noise can add a tiny imaginary part
    value = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root)
    return float(max(value, 0.0))


def fidelity_report(
    twin: Data, real_train: Data, val: Data, eval_cfg: Mapping, n_classes: int, progress=False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fréchet distances (twin vs val and vs train, with real train vs val as the floor) and
    precision/recall/density/coverage against val (``fedtwin.manifold``, real train vs val
    beside them as the ceiling), overall and per class, in one feature space."""
    seed = int(eval_cfg["seeds"][0])
    model = train_classifier(
        *capped(*real_train, eval_cfg, seed),
        n_classes,
        epochs=int(eval_cfg["feature_epochs"]),
        batch_size=int(eval_cfg["batch_size"]),
        lr=float(eval_cfg["lr"]),
        seed=int(eval_cfg["seeds"][0]),
        progress=progress,
        desc="feature CNN",
    )
    f_twin, f_train, f_val = (features(model, d[0]) for d in (twin, real_train, val))
    per_class = {}
    for c in range(n_classes):
        t, v = f_twin[twin[1] == c], f_val[val[1] == c]
        if len(t) >= 2 and len(v) >= 2:
            per_class[str(c)] = frechet_distance(t, v)
    frechet = {
        "feature_space": FEATURE_SPACE,
        "twin_vs_val": frechet_distance(f_twin, f_val),
        "twin_vs_train": frechet_distance(f_twin, f_train),
        "train_vs_val_floor": frechet_distance(f_train, f_val),
        "per_class_twin_vs_val": per_class,
    }
    manifold = manifold_report(
        (f_val, val[1]),
        (f_twin, twin[1]),
        (f_train, real_train[1]),
        n_classes=n_classes,
        seed=int(eval_cfg["seeds"][0]),
    )
    return frechet, {"feature_space": FEATURE_SPACE, **manifold}


EVALUATION_PHASES = ("TSTR and TRTR", "Fréchet distance and coverage", "realism two-sample test")


def evaluate_twin(
    twin: Data,
    real_train: Data,
    val: Data,
    eval_cfg: Mapping,
    *,
    n_classes: int,
    progress=False,
    on_phase: Callable[[str], None] | None = None,
    twin_classifiers: Mapping[int, Classifier] | None = None,
) -> dict[str, Any]:
    """TSTR, TRTR, Fréchet distances and PRDC of a twin (see the module docstring), and
    whether it looks real (``fedtwin.realism``: the two-sample test and the spectra).
    ``on_phase`` is called with each of ``EVALUATION_PHASES`` as it starts;
    ``twin_classifiers`` as in ``tstr_trtr``."""
    from fedtwin.realism import realism_report  # it trains its classifier with this module

    on_phase = on_phase or (lambda name: None)
    on_phase(EVALUATION_PHASES[0])
    result = tstr_trtr(twin, real_train, val, eval_cfg, n_classes, progress, twin_classifiers)
    on_phase(EVALUATION_PHASES[1])
    result["frechet"], result["manifold"] = fidelity_report(
        twin, real_train, val, eval_cfg, n_classes, progress
    )
    on_phase(EVALUATION_PHASES[2])
    result["realism"] = realism_report(
        twin[0], real_train[0], val[0], eval_cfg, seed=int(eval_cfg["seeds"][0]),
        progress=progress,
    )  # fmt: skip
    return result
