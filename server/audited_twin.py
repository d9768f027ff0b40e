"""After training: make the candidate twin, audit it at the hospitals, write it, sign it.

1. the global generator makes the twin, labels mixed from the hospitals' noisy class
   shares (released under DP during training);
2. a classifier is trained on the twin alone (it has seen no real image, so it may travel);
3. one ``query.audit`` message per hospital carries twin and classifier; each hospital
   answers with its audit and utility aggregates (``client_app.audit``), and with
   ``eval.hybrid`` the scores of its own classifiers, on its images alone and with the twin,
   and of its two-sample test of the twin's realism (``fedtwin.realism.site_two_sample``);
4. the server pools them (``fedtwin.audit_pool.pool``, ``fedtwin.utility.pool_utility``,
   ``fedtwin.realism.pool_two_sample``; with ``audit.canaries`` the canary counts and the
   empirical epsilon lower bound, ``fedtwin.canaries.pool_canaries``) and writes the twin
   directory with ``audit.json`` and a manifest holding them;
5. the gate (``fedtwin.gate``): only a twin that passed, or one the operator overrode
   with a recorded reason, is signed with the consortium's key (``manifest.sig``).
"""

from __future__ import annotations

from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedtwin.audit_pool import pool
from fedtwin.canaries import pool_canaries
from fedtwin.config import class_weights, resolve_device
from fedtwin.gate import consortium_key, final_epsilons, label_counts, write_gated_twin
from fedtwin.metrics import TWIN_CLASSIFIER, classifier_from_config, recipe, save_classifier
from fedtwin.models import model_from_config
from fedtwin.quality import federated_quality
from fedtwin.realism import pool_two_sample
from fedtwin.server import messages
from fedtwin.signing import public_key_path
from fedtwin.tensors import get_weights, set_weights
from fedtwin.twin import generate_from_rounds, label_mix
from fedtwin.utility import pool_utility

AUDIT_PARAMETERS = ("copy_margin", "copy_coarse", "density_k", "bins", "max_records")
UTILITY_KINDS = {  # which classifier's holdout scores: the twin's, or the hospital's own two
    "twin": messages.UTILITY,
    "real_only": messages.UTILITY_REAL,
    "hybrid": messages.UTILITY_HYBRID,
}
SITE_RECORDS = {**UTILITY_KINDS, "two_sample": messages.TWO_SAMPLE}  # and its two-sample test


def ask_hospitals(
    grid: Grid,
    twin: tuple[np.ndarray, np.ndarray],
    classifier: dict,
    audit_cfg: dict,
    timeout: float | None,
) -> tuple[dict, dict, list[dict]]:
    """Send the audit query to every node; returns audit aggregates and utility aggregates
    (``{"twin": ..., "real_only": ..., "hybrid": ..., "two_sample": ...}``, the last three
    with ``eval.hybrid``) by hospital name, and the nodes that did not answer with their
    reason."""
    images, labels = twin
    content = RecordDict(
        {
            messages.TWIN: messages.to_record({"images": images, "labels": labels}),
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
        utilities[name] = {
            kind: messages.unflatten(dict(reply.content[key]))
            for kind, key in SITE_RECORDS.items()
            if key in reply.content
        }
    failed += [{"node": n, "reason": "no answer"} for n in nodes if n not in answered]
    return audits, utilities, failed


def signing_key(cfg: dict, out: Path):
    """The consortium's signing key (``fedtwin.gate.consortium_key``), saying so when a new
    one had to be made."""
    key, path, made = consortium_key(cfg, out)
    if made:
        log(WARNING, "no twin.signing_key given: made a new signing key %s", path)
    return key


def log_canaries(canaries: dict) -> None:
    """The canary audit in the server log: counts, the lower bound, the accounted epsilon."""
    log(INFO, "canaries: %d of %d guesses right on %d canaries at %d hospitals; empirical "
        "epsilon >= %.2f (95 %%; at most %.2f with these guesses) against accounted "
        "epsilon %.2f", canaries["correct"], canaries["guessed"], canaries["canaries"],
        canaries["hospitals"], canaries["epsilon_lower_bound"],
        canaries["epsilon_lower_bound_max"], canaries["epsilon_accounted"])  # fmt: skip


def log_two_sample(test: dict) -> None:
    """The hospitals' two-sample test in the server log: pooled AUC, hospitals, counts."""
    if test["auc"] is not None:
        log(INFO, "realism at the hospitals: a CNN tells twin from real holdout images with "
            "AUC %.3f [%.3f, %.3f] (0.5 = cannot tell) at %d hospitals, %d real and %d twin "
            "images", test["auc"], test["low"], test["high"], test["hospitals"],
            test["n_real"], test["n_twin"])  # fmt: skip
    for name, reason in test["skipped"].items():
        log(INFO, "realism: no two-sample test at %s: %s", name, reason)


def make_audited_twin(
    grid: Grid, cfg: dict, out: Path, global_models: list[tuple[int, dict]], history: list[dict]
) -> dict[str, Any]:
    """Steps 1-5 of the module docstring; returns the gate (verdict, signed, override).

    ``global_models`` are (round, weights) of the last ``twin.checkpoints`` rounds
    (``fedtwin.checkpoints.recent_global_models``); each makes an equal share of the twin."""
    n_classes = len(cfg["data"]["classes"])
    seed, tw, ev, au = int(cfg["seed"]), cfg["twin"], cfg["eval"], cfg["audit"]
    models = []
    for _, weights in global_models:
        model = model_from_config(cfg)
        set_weights(model, weights)
        models.append(model)
    counts, weights = label_counts(history, n_classes), class_weights(cfg)
    labels = label_mix(counts, int(tw["size"]), tw["label_mix"], seed, weights)
    device = resolve_device(str(cfg["device"]))
    images = generate_from_rounds(models, labels, seed, device=device)
    rounds = [r for r, _ in global_models]
    log(INFO, "twin: %d candidate images from the global models of rounds %s; training the "
        "twin classifier", len(images), ", ".join(map(str, rounds)))  # fmt: skip
    classifier = classifier_from_config(images, labels, n_classes, ev, seed)
    # kept for the demo's evaluation: its TSTR would train this very model again
    save_classifier(Path(out) / TWIN_CLASSIFIER, classifier, recipe(images, labels, ev, seed))
    log(INFO, "twin: privacy audit and utility at the hospitals")
    timeout = au.get("timeout_s")
    audits, utilities, failed = ask_hospitals(
        grid, (images, labels), get_weights(classifier), au, float(timeout) if timeout else None
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
    canaries = [a["canaries"] for n, a in audits.items() if n in trained and "canaries" in a]
    if canaries:
        accounted = max(final_epsilons(history).values())  # the weakest guarantee of them
        audit["canaries"] = pool_canaries(canaries, float(cfg["privacy"]["delta"]), accounted)
        log_canaries(audit["canaries"])
    missing = sorted(trained - set(audits))
    audit["not_audited"] = {"hospitals": missing, "nodes": failed}
    if missing:
        audit["verdict"] = "fail"
        audit["notes"].append(
            f"not audited: {', '.join(missing)} trained the generator but did not answer the "
            f"audit ({'; '.join(f['reason'] for f in failed) or 'no answer'})"
        )
    utility = pool_utility({n: u["twin"] for n, u in utilities.items()})
    for kind in ("real_only", "hybrid"):  # the hospitals' own classifiers (eval.hybrid)
        answered = {n: u[kind] for n, u in utilities.items() if kind in u}
        if answered:
            utility[kind] = pool_utility(answered)
    tests = {n: u["two_sample"] for n, u in utilities.items() if "two_sample" in u}
    if tests:  # the hospitals' two-sample tests (eval.hybrid): pooled, said in the log
        utility["two_sample"] = pool_two_sample(tests)
        log_two_sample(utility["two_sample"])
    gate = write_gated_twin(
        Path(out), cfg, images, labels, audit, utility, history, rounds,
        key=lambda: signing_key(cfg, out),
    )  # fmt: skip
    twin_dir = Path(out) / "twin"
    if gate["signed"]:
        if gate["override"]:
            log(WARNING, "twin failed the audit and was SIGNED by override: %s", gate["override"])
        key_file = cfg["twin"].get("signing_key") or Path(out) / "keys" / "consortium-signing.pem"
        log(INFO, "twin signed; verify with: fedtwin verify %s --public-key %s",
            twin_dir, public_key_path(key_file))  # fmt: skip
    else:
        log(WARNING, "twin FAILED the privacy audit: not signed (see %s)", twin_dir / "audit.json")
    log(
        INFO,
        "audit %s; federated utility AUC %.3f ACC %.3f over %d holdout images",
        audit["verdict"],
        utility["auc"],
        utility["acc"],
        utility["n"],
    )
    for warning in federated_quality(utility, cfg["eval"])["warnings"]:  # in the manifest too
        log(WARNING, "twin quality: %s", warning)
    return gate
