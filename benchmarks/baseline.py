"""Part (c): the baseline a twin must beat: a DP-SGD classifier trained federated at the
same epsilon directly on the real data (same hospitals, rounds, local steps and batch
size as the generator), scored by AUC and accuracy on val.
"""

from __future__ import annotations

import time

import numpy as np


def part_c(cfg: dict) -> dict:
    from fedtwin.baseline import train_federated_dp_classifier
    from fedtwin.demo import load_real_data, simulate_hospitals
    from fedtwin.metrics import classification_scores, predict_proba

    start = time.time()
    train, val, _ = load_real_data(cfg)
    hospitals = simulate_hospitals(cfg, train)
    fed = cfg["federation"]
    runs = []
    for seed in cfg["eval"]["seeds"][:1]:  # one seed: each costs as much as a federation
        model, eps = train_federated_dp_classifier(
            hospitals,
            {**cfg, "seed": int(seed)},
            rounds=int(fed["rounds"]),
            local_steps=int(fed["local_steps"]),
            batch_size=int(fed["batch_size"]),
            progress=True,
        )
        scores = classification_scores(predict_proba(model, val.images), val.labels)
        runs.append({"seed": int(seed), **scores})
    return {
        "what": "classifier trained federated with DP-SGD on the real images (FedAvg, "
        "same hospitals, rounds, local steps and batch size as the generator; C = 1); "
        "one seed",
        "auc_mean": float(np.mean([r["auc"] for r in runs])),
        "auc_std": float(np.std([r["auc"] for r in runs])),
        "acc_mean": float(np.mean([r["acc"] for r in runs])),
        "acc_std": float(np.std([r["acc"] for r in runs])),
        "per_seed": runs,
        "epsilon_per_hospital": eps,
        "wall_time_s": time.time() - start,
    }
