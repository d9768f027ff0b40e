"""After training: make the candidate twin, audit it at the hospitals, write it, sign it.

1. the global generator makes the twin, labels mixed from the hospitals' noisy class
   shares (released under DP during training);
2. a classifier is trained on the twin alone (it has seen no real image, so it may travel);
3. one ``query.audit`` message per hospital carries twin and classifier; each hospital
   answers with its audit and utility aggregates (``client_app.audit``);
4. the server pools them (``fedtwin.audit.pool``, ``fedtwin.utility.pool_utility``) and
   writes the twin directory with ``audit.json`` and a manifest holding both;
5. the gate: only a twin that passed, or one the operator overrode with a recorded
   reason, is signed with the consortium's key (``manifest.sig``).
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtwin import messages
from fedtwin.audit import pool, summary
from fedtwin.metrics import train_classifier
from fedtwin.models import build_model
from fedtwin.signing import load_signing_key, make_signing_key, public_key_path, sign_twin
from fedtwin.training import get_weights, set_weights
from fedtwin.twin import generate_from_rounds, label_mix, write_twin
from fedtwin.utility import pool_utility

AUDIT_PARAMETERS = ("copy_margin", "copy_coarse", "density_k", "bins")


def label_counts(history: list[dict], n_classes: int) -> np.ndarray:
    """The federation's class counts as the server knows them: each hospital's noisy class
    shares (from its last round) times its number of training images."""
    latest: dict[str, dict] = {}
    for entry in history:
        latest.update(entry["hospitals"])
    counts = np.zeros(n_classes)
    for m in latest.values():
        counts += np.asarray(m["label-shares"], dtype=float) * float(m["num-examples"])
    if counts.sum() <= 0:
        raise RuntimeError("no hospital reported class shares: cannot choose the twin's labels")
    return counts


def final_epsilons(history: list[dict]) -> dict[str, float]:
    """Each hospital's epsilon after the last round it took part in."""
    eps: dict[str, float] = {}
    for entry in history:
        for name, m in entry["hospitals"].items():
            eps[name] = float(m["epsilon"])
    return eps


def ask_hospitals(
    grid: Grid, images: np.ndarray, classifier: dict, audit_cfg: dict, timeout: float | None
) -> tuple[dict, dict, list[dict]]:
    """Send the audit query to every node; returns audit and utility aggregates by
    hospital name, and the nodes that did not answer with their reason."""
    content = RecordDict(
        {
            messages.TWIN: messages.to_record({"images": images}),
            messages.CLASSIFIER: messages.to_record(classifier),
            messages.AUDIT: ConfigRecord({k: audit_cfg[k] for k in AUDIT_PARAMETERS}),
        }
    )
    nodes = list(grid.get_node_ids())
    queries = [Message(content, dst_node_id=n, message_type=messages.AUDIT_QUERY) for n in nodes]
    audits, utilities, failed = {}, {}, []
    answered = set()
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        answered.add(node)
        if reply.has_error():
            failed.append({"node": node, "reason": reply.error.reason})
            continue
        name = str(reply.content[messages.HOSPITAL]["name"])
        audits[name] = messages.unflatten(dict(reply.content[messages.AUDIT]))
        utilities[name] = messages.unflatten(dict(reply.content[messages.UTILITY]))
    failed += [{"node": n, "reason": "no answer"} for n in nodes if n not in answered]
    return audits, utilities, failed


def signing_key(cfg: dict, out: Path):
    """The consortium's signing key from ``twin.signing_key``; without one, a key made
    once under ``out/keys`` (fine for a demo, not for a consortium)."""
    path = cfg["twin"].get("signing_key")
    if path:
        return load_signing_key(Path(path))
    path = Path(out) / "keys" / "consortium-signing.pem"
    if path.exists():
        return load_signing_key(path)
    log(WARNING, "no twin.signing_key given: made a new signing key %s", path)
    return make_signing_key(path)


def publish_twin(
    grid: Grid, cfg: dict, out: Path, global_models: list[tuple[int, dict]], history: list[dict]
) -> dict[str, Any]:
    """Steps 1-5 of the module docstring; returns the gate (verdict, signed, override).

    ``global_models`` are (round, weights) of the last ``twin.checkpoints`` rounds
    (``strategy.recent_global_models``); each makes an equal share of the twin."""
    n_classes = len(cfg["data"]["classes"])
    seed, tw, ev, au = int(cfg["seed"]), cfg["twin"], cfg["eval"], cfg["audit"]
    models = []
    for _, weights in global_models:
        model = build_model(cfg["model"], n_classes, int(cfg["data"]["image_size"]))
        set_weights(model, weights)
        models.append(model)
    labels = label_mix(label_counts(history, n_classes), int(tw["size"]), tw["label_mix"], seed)
    device = str(cfg.get("device_resolved", "cpu"))
    images = generate_from_rounds(models, labels, seed, device=device)
    rounds = [r for r, _ in global_models]
    log(INFO, "twin: %d candidate images from the global models of rounds %s; training the "
        "twin classifier", len(images), ", ".join(map(str, rounds)))  # fmt: skip
    classifier = train_classifier(
        images,
        labels,
        n_classes,
        epochs=int(ev["epochs"]),
        batch_size=int(ev["batch_size"]),
        lr=float(ev["lr"]),
        seed=seed,
    )
    log(INFO, "twin: privacy audit and utility at the hospitals")
    timeout = au.get("timeout_s")
    audits, utilities, failed = ask_hospitals(
        grid, images, get_weights(classifier), au, float(timeout) if timeout else None
    )
    trained = set(final_epsilons(history))
    # Only a hospital that trained has members: the others' images would dilute the test.
    audit = pool({n: a for n, a in audits.items() if n in trained}, au, images.shape[1])
    bystanders = sorted(set(audits) - trained)
    if bystanders:
        audit["notes"].append(
            f"left out of the audit: {', '.join(bystanders)} did not train this generator "
            f"(none of their images is a member); their holdouts still score the utility"
        )
    missing = sorted(trained - set(audits))
    audit["not_audited"] = {"hospitals": missing, "nodes": failed}
    if missing:
        audit["verdict"] = "fail"
        audit["notes"].append(
            f"not audited: {', '.join(missing)} trained the generator but did not answer the "
            f"audit ({'; '.join(f['reason'] for f in failed) or 'no answer'})"
        )
    utility = pool_utility(utilities)
    gate = write_gated_twin(Path(out), cfg, images, labels, audit, utility, history, rounds)
    log(
        INFO,
        "audit %s; federated utility AUC %.3f ACC %.3f over %d holdout images",
        audit["verdict"],
        utility["auc"],
        utility["acc"],
        utility["n"],
    )
    return gate


def write_gated_twin(
    out: Path,
    cfg: dict,
    images: np.ndarray,
    labels: np.ndarray,
    audit: dict,
    utility: dict,
    history: list[dict],
    generator_rounds: list[int],
) -> dict[str, Any]:
    """Write ``out/twin`` with ``audit.json`` and the manifest; sign it only if the audit
    passed or ``audit.override`` gives the operator's reason (recorded in the manifest).
    Returns the gate: audit verdict, signed, override."""
    classes, tw, au = list(cfg["data"]["classes"]), cfg["twin"], cfg["audit"]
    missing = audit["not_audited"]["hospitals"]
    override = au.get("override")
    passed = audit["verdict"] == "pass"
    gate = {
        "audit_verdict": audit["verdict"],
        "signed": passed or bool(override),
        "override": None if passed else override,
    }
    dp = bool(cfg["privacy"]["enabled"])
    twin_dir = out / "twin"
    write_twin(
        twin_dir,
        images,
        labels,
        class_names=classes,
        provenance={
            "config": cfg,
            "rounds_completed": max((e["round"] for e in history), default=0),
            "generator_rounds": generator_rounds,  # the global models that made the twin
            "privacy": {
                "dp": dp,
                "delta": float(cfg["privacy"]["delta"]),
                "epsilon_per_hospital": final_epsilons(history),
                "unit": "one image (sample-level DP); no patient-level claim",
                "note": None if dp else "DP off: epsilon = inf, no privacy guarantee",
            },
            "source_data": {"name": cfg["data"]["name"]},
            "audit": {**summary(audit), "not_audited": missing},
            "federated_utility": {
                "classifier": "trained on the twin only, scored on every hospital's holdout",
                **utility,
            },
            "gate": gate,
        },
        documents={"audit.json": audit},
        dicom=bool(tw["dicom"]),
    )
    if gate["signed"]:
        key = signing_key(cfg, out)
        sign_twin(twin_dir, key)
        if override:
            log(WARNING, "twin failed the audit and was SIGNED by override: %s", override)
        key_file = cfg["twin"].get("signing_key") or out / "keys" / "consortium-signing.pem"
        log(
            INFO,
            "twin signed; verify with: fedtwin verify %s --public-key %s",
            twin_dir,
            public_key_path(key_file),
        )
    else:
        log(WARNING, "twin FAILED the privacy audit: not signed (see %s)", twin_dir / "audit.json")
    return gate
