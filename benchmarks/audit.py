"""Part (e): the privacy audit: wall time per hospital (audit + utility scoring) for
twins of 1k, 5k and 20k images, and its growth with the twin's size; and, as
calibration, the audit of real val images posing as a twin (what a twin that is as close
to the hospitals as new real patients would score).
"""

from __future__ import annotations

import time

import numpy as np
import torch


def part_e(cfg: dict) -> dict:
    from fedtwin.audit import site_audit
    from fedtwin.demo import load_real_data, simulate_hospitals
    from fedtwin.metrics import features, train_classifier
    from fedtwin.models import build_model
    from fedtwin.twin import generate
    from fedtwin.utility import site_utility

    train, val, _ = load_real_data(cfg)
    hospitals = simulate_hospitals(cfg, train)
    n_classes, size = len(cfg["data"]["classes"]), int(cfg["data"]["image_size"])
    torch.manual_seed(0)
    model = build_model(cfg["model"], n_classes, size)  # timing does not depend on weights
    sizes = (200, 500, 1000) if cfg.get("quick") else (1000, 5000, 20000)
    out: dict = {
        "what": "site_audit + site_utility at each hospital (the work of one audit query), "
        "twin from an untrained generator: the work depends on sizes, not on content",
        "threads": torch.get_num_threads(),
        "hospitals": {
            h.name: {"train": len(h.train), "holdout": len(h.holdout)} for h in hospitals
        },
        "by_twin_size": {},
    }
    for n in sizes:
        labels = np.arange(n) % n_classes
        twin = generate(model, labels, seed=0)
        start = time.time()
        clf = train_classifier(twin, labels, n_classes, epochs=1, batch_size=128, lr=1e-3, seed=0)
        row: dict = {"classifier_1_epoch_s": time.time() - start, "per_hospital_s": {}}
        for h in hospitals:
            start = time.time()
            site_audit(
                twin,
                h.train.images,
                h.holdout.images,
                cfg["audit"],
                embed=lambda x, clf=clf: features(clf, x),
            )
            site_utility(clf, h.holdout.images, h.holdout.labels)
            row["per_hospital_s"][h.name] = time.time() - start
        row["mean_per_hospital_s"] = float(np.mean(list(row["per_hospital_s"].values())))
        out["by_twin_size"][str(n)] = row
        print(f"[benchmark] audit, twin of {n}: {row['mean_per_hospital_s']:.1f} s per hospital")
    first, last = (
        out["by_twin_size"][str(n)]["mean_per_hospital_s"] for n in (sizes[0], sizes[-1])
    )
    out[f"growth_{sizes[-1]}_over_{sizes[0]}"] = last / first
    out["real_val_as_twin"] = audit_real_as_twin(cfg, hospitals, val)
    return out


def audit_real_as_twin(cfg: dict, hospitals, val) -> dict:
    """The audit's verdict when the "twin" is real val data (never trained on, but from
    the same population): where an honest, perfect generator would land."""
    from fedtwin.audit import site_audit
    from fedtwin.audit_pool import pool, summary
    from fedtwin.metrics import features, train_classifier

    n_classes = len(cfg["data"]["classes"])
    twin, labels = val.images, val.labels
    clf = train_classifier(twin, labels, n_classes, epochs=3, batch_size=128, lr=1e-3, seed=0)
    sites = {
        h.name: site_audit(twin, h.train.images, h.holdout.images, cfg["audit"],
                           embed=lambda x: features(clf, x))
        for h in hospitals
    }  # fmt: skip
    audit = pool(sites, cfg["audit"], int(cfg["data"]["image_size"]))
    return {"twin": f"real val split ({len(twin)} images)", **summary(audit)}
