"""What a hospital does for each request of a run, Flower's records in and out (the
ClientApp, ``fedtwin.client.client_app``, hands each message here):

- ``train`` with ``task=release`` (once, before round 1, when the model uses feature
  statistics): release the hospital's noisy per-class feature sums (``fedtwin.features``)
  in the ``feature_release`` array of the model, recorded in the ledger before it leaves;
  the server's average of them over hospitals is the consortium's pooled statistics.
- ``train``: run the hospital's DP local round (``fedtwin.training.local_round``) within
  the budget of its privacy ledger (``fedtwin.ledger``: SQLite on the hospital's disk,
  which outlives the ClientApp, the node and the run), commit the privacy spent and the
  reply to the ledger, then send back weights, example count and epsilon. A request
  answered before is answered again from the ledger at no privacy cost; one that would
  pass the budget is refused.
- ``audit``: run the privacy audit (``fedtwin.audit.site_audit``) and the utility scoring
  (``fedtwin.utility.site_utility``) of a candidate twin on the hospital's own images,
  and send back aggregates only; with ``audit.canaries``, also how many of its canaries
  (``fedtwin.canaries``: trained on by a secret coin) it guessed, and how many right;
  with ``eval.hybrid``, also the scores of classifiers it trains on its own images: the
  twin's classifier's architecture on them alone, the twin's classifier fine-tuned on them
  mixed with twin images, and the two-sample test of the twin's realism
  (``fedtwin.realism.site_two_sample``).
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedtwin.audit import site_audit
from fedtwin.canaries import (
    canary_scores,
    coins,
    guess,
    hospital_secret,
    loader_batch,
    make_canaries,
    tally,
    with_canaries,
)
from fedtwin.config import resolve_device
from fedtwin.data import Hospital, Split
from fedtwin.features import noisy_feature_sums, release_rows
from fedtwin.ledger import Ledger, digest
from fedtwin.metrics import Classifier, classifier_from_config, features, hybrid_classifier
from fedtwin.models import model_from_config
from fedtwin.privacy import (
    BudgetExceeded,
    PrivacyPlan,
    noisy_class_shares,
    plan_from_config,
    uses_features,
)
from fedtwin.realism import site_two_sample
from fedtwin.seeds import derive_seed
from fedtwin.server import messages
from fedtwin.tensors import set_weights
from fedtwin.training import local_round
from fedtwin.utility import site_utility

THREADS = 1  # torch threads per message: simulated hospitals share one machine's cores

OPTIMIZER_STATE = "optimizer-state"  # Adam moments, local only: the next round resumes them


def round_seed(seed: int, hospital: str, server_round: int) -> int:
    return derive_seed(seed, hospital, server_round)


def _optimizer_state(context: Context) -> bytes:
    record = context.state.get(OPTIMIZER_STATE)
    return bytes(record["state"]) if record is not None else b""


def train(msg: Message, context: Context, cfg: dict, hospital: Hospital, ledger_path: Path):
    """Answer a training request within the ledger's budget; refuse (BudgetExceeded, also
    on the ledger's record) if it would pass it."""
    torch.set_num_threads(THREADS)
    pcfg, server = cfg["privacy"], msg.content[messages.CONFIG]
    steps = int(server["local-steps"])
    ledger = Ledger(ledger_path, float(pcfg["delta"]), pcfg["accountant"])
    request = digest(
        hospital.name,
        str(server["server-round"]),
        str(steps),
        *(a.tobytes() for a in messages.from_record(msg.content[messages.ARRAYS]).values()),
    )
    try:
        if str(server.get(messages.TASK, "")) == messages.RELEASE:
            return _release_round(msg, context, cfg, hospital, ledger)
        return _train_round(msg, context, cfg, hospital, ledger, request, steps)
    except BudgetExceeded as e:  # refused: on the hospital's record, and sent back
        reason = f"{hospital.name}: {e}"
        ledger.refuse(reason, run=str(context.run_id), round=int(server["server-round"]))
        raise BudgetExceeded(reason) from None  # the round goes on without us


def audit(msg: Message, cfg: dict, hospital: Hospital, ledger_path: Path) -> Message:
    """The audit's and the utility scoring's aggregates over the hospital's own images
    (with canaries, their counts too; with ``eval.hybrid``, its own classifiers' scores
    and its two-sample test's)."""
    torch.set_num_threads(THREADS)
    twin = msg.content[messages.TWIN]["images"].numpy()
    classifier = Classifier(len(cfg["data"]["classes"]), int(cfg["data"].get("channels", 1)))
    set_weights(classifier, messages.from_record(msg.content[messages.CLASSIFIER]))
    classifier.eval()
    site = site_audit(
        twin,
        hospital.train.images,
        hospital.holdout.images,
        dict(msg.content[messages.AUDIT]),  # the server's parameters: shared bins
        embed=lambda images: features(classifier, images),
        seed=round_seed(int(cfg["seed"]), hospital.name, 0),
    )
    counts = canary_counts(cfg, hospital, ledger_path, twin)
    if counts is not None:
        site["canaries"] = counts
    utility = site_utility(classifier, hospital.holdout.images, hospital.holdout.labels)
    content = RecordDict(
        {
            messages.AUDIT: MetricRecord(messages.flatten(site)),
            messages.UTILITY: MetricRecord(messages.flatten(utility)),
            messages.HOSPITAL: ConfigRecord({"name": hospital.name}),
        }
    )
    if not cfg["eval"]["hybrid"]:  # classifiers trained here: the node may refuse them
        return Message(content=content, reply_to=msg)
    if "labels" in msg.content[messages.TWIN]:  # an older server sends no labels
        labels = msg.content[messages.TWIN]["labels"].numpy()
        for key, scores in own_classifiers(cfg, hospital, (twin, labels), classifier).items():
            content[key] = MetricRecord(messages.flatten(scores))
    test = site_two_sample(
        twin,
        hospital.train.images,
        hospital.holdout.images,
        cfg["eval"],
        seed=derive_seed(int(cfg["seed"]), hospital.name, "two-sample"),
    )
    content[messages.TWO_SAMPLE] = MetricRecord(messages.flatten(test))
    return Message(content=content, reply_to=msg)


def planted_canaries(
    cfg: dict, hospital: Hospital, ledger_path: Path
) -> tuple[Split, np.ndarray] | None:
    """The hospital's canaries and its secret coins (``fedtwin.canaries``; the secret is
    kept beside its ledger), or None without ``audit.canaries``."""
    m = int(cfg["audit"].get("canaries") or 0)
    if not m:
        return None
    shape, n_classes = hospital.train.images.shape[1:], len(cfg["data"]["classes"])
    canaries = make_canaries(m, shape, n_classes, int(cfg["seed"]), hospital.name)
    secret = hospital_secret(ledger_path.with_suffix(".canary-secret"))
    return canaries, coins(secret, hospital.name, m)


def canary_counts(
    cfg: dict, hospital: Hospital, ledger_path: Path, twin: np.ndarray
) -> dict[str, int] | None:
    """Canaries, guesses and right guesses, scored with the weights this hospital last
    sent and the label mix it trained with (both kept in its ledger); None without
    canaries or before it trained."""
    planted = planted_canaries(cfg, hospital, ledger_path)
    if planted is None:
        return None
    ledger = Ledger(ledger_path, float(cfg["privacy"]["delta"]), cfg["privacy"]["accountant"])
    sent, shares = ledger.last_reply("train"), ledger.last_reply("labels")
    if sent is None or shares is None:
        return None
    model = model_from_config(cfg)
    model.label_prior = torch.as_tensor(json.loads(shares), dtype=torch.float32)
    set_weights(model, messages.unpack_reply(sent)[0])
    canaries, taken = planted
    scores = canary_scores(model, canaries, twin)
    au = cfg["audit"]
    return tally(guess(scores, float(au["canary_guesses"]), str(au["canary_side"])), taken)


def training_records(
    cfg: dict, hospital: Hospital, ledger_path: Path, plan: PrivacyPlan
) -> tuple[Split, int]:
    """The records a round trains on and the loader's batch size: the hospital's images,
    and with canaries those its coins took, sampled at the plan's rate all the same."""
    batch = int(cfg["federation"]["batch_size"])
    planted = planted_canaries(cfg, hospital, ledger_path)
    if planted is None:
        return hospital.train, batch
    records = with_canaries(hospital.train, *planted)
    return records, loader_batch(len(records), plan.sample_rate)


def own_classifiers(
    cfg: dict, hospital: Hospital, twin: tuple[np.ndarray, np.ndarray], start: Classifier
) -> dict[str, dict]:
    """The hospital's own question, does the twin help *me*: the twin's classifier
    architecture trained here on the hospital's training images alone, and the twin's
    classifier (``start``) fine-tuned on them mixed with twin images (``hybrid_classifier``),
    each scored on its holdout (``site_utility`` aggregates; the models stay here)."""
    ev, n_classes, seed = cfg["eval"], len(cfg["data"]["classes"]), int(cfg["eval"]["seeds"][0])
    own = (hospital.train.images, hospital.train.labels)
    models = {
        messages.UTILITY_REAL: classifier_from_config(*own, n_classes, ev, seed),
        messages.UTILITY_HYBRID: hybrid_classifier(start, own, twin, n_classes, ev, seed),
    }
    return {
        key: site_utility(model, hospital.holdout.images, hospital.holdout.labels)
        for key, model in models.items()
    }


def _train_round(
    msg: Message,
    context: Context,
    cfg: dict,
    hospital: Hospital,
    ledger: Ledger,
    request: str,
    steps: int,
) -> Message:
    """Answer one training request within the ledger's budget (BudgetExceeded if not)."""
    answered = ledger.answered("train", request)
    if answered:  # a retried request: the same reply again costs no privacy
        weights, metrics = messages.unpack_reply(answered)
        return _train_reply(msg, hospital, weights, metrics)
    server_round = int(msg.content[messages.CONFIG]["server-round"])
    if answered is not None:  # answered long ago, reply no longer kept: do not pay twice
        raise BudgetExceeded(f"round {server_round} was answered before; not again")

    plan = _plan(msg, cfg, hospital, ledger)
    records, batch = training_records(cfg, hospital, ledger.path, plan)
    n_classes = len(cfg["data"]["classes"])
    shares = _label_shares(ledger, hospital, n_classes, plan, str(context.run_id))
    model = model_from_config(cfg)
    model.label_prior = torch.as_tensor(shares, dtype=torch.float32)
    set_weights(model, messages.from_record(msg.content[messages.ARRAYS]))
    started = time.perf_counter()
    result = local_round(
        model,
        records.images,
        records.labels,
        plan,
        steps=steps,
        batch_size=batch,
        history=ledger.history(),
        seed=round_seed(int(cfg["seed"]), hospital.name, server_round),
        device=resolve_device(str(cfg["device"])),  # on the hospital's own machine
        optimizer_state=_optimizer_state(context),
    )
    release = (plan.noise_multiplier, plan.sample_rate, result.steps)
    epsilon = ledger.epsilon([*ledger.history(), release])  # inf when DP is off
    # The hospital's own image count: with canaries, nothing sent depends on its coins.
    n = len(hospital.train)
    metrics = dict(messages.round_metrics(n, epsilon, result.steps, result.losses, shares))
    metrics["train-seconds"] = time.perf_counter() - started  # the local compute alone
    # The privacy spent and the reply are on the hospital's disk before the weights leave.
    ledger.commit(
        "train",
        request,
        release,
        messages.pack_reply(result.weights, metrics),
        run=str(context.run_id),
        round=server_round,
    )
    ledger.forget_old_replies()
    context.state[OPTIMIZER_STATE] = ConfigRecord({"state": result.optimizer_state})
    return _train_reply(msg, hospital, result.weights, metrics)


def _plan(msg: Message, cfg: dict, hospital: Hospital, ledger: Ledger) -> PrivacyPlan:
    """The hospital's plan for this federation: its releases and every round it agreed to
    (the server cannot stretch it), with noise calibrated for what the ledger had left when
    this federation first asked."""
    fed = cfg["federation"]
    federation = str(msg.content[messages.CONFIG].get("federation", ""))
    return plan_from_config(
        cfg["privacy"],
        n_train=len(hospital.train),
        batch_size=int(fed["batch_size"]),
        total_steps=int(fed["rounds"]) * int(fed["local_steps"]),
        features=uses_features(cfg),
        prior=ledger.prior(federation) if federation else (),
    )


def _release_round(
    msg: Message, context: Context, cfg: dict, hospital: Hospital, ledger: Ledger
) -> Message:
    """The one-shot release: the received weights with ``feature_release`` holding this
    hospital's noisy per-class feature sums and class counts over its image count
    (``fedtwin.features.release_rows``). Released once for its data and answered from
    the ledger ever after."""
    if not uses_features(cfg):
        raise ValueError(f"{hospital.name}: asked for a feature release, but model.features "
                         f"is null in this hospital's config")  # fmt: skip
    plan = _plan(msg, cfg, hospital, ledger)
    n_classes = len(cfg["data"]["classes"])
    run = str(context.run_id)
    shares = _label_shares(ledger, hospital, n_classes, plan, run)
    weights = messages.from_record(msg.content[messages.ARRAYS])
    if "feature_release" not in weights:
        raise ValueError(f"{hospital.name}: the model sent has no feature_release array")
    weights["feature_release"] = _feature_rows(ledger, hospital, cfg, plan, shares, run)
    epsilon = ledger.epsilon()
    metrics = dict(messages.round_metrics(len(hospital.train), epsilon, 0, {}, shares))
    return _train_reply(msg, hospital, weights, metrics)


def _feature_rows(
    ledger: Ledger, hospital: Hospital, cfg: dict, plan: PrivacyPlan, shares: np.ndarray, run: str
) -> np.ndarray:
    """The hospital's feature release ``(K, D + 1)``: computed and recorded once, before it
    leaves; the same rows ever after."""
    n_classes = len(cfg["data"]["classes"])
    model = model_from_config(cfg)
    labels = np.asarray(hospital.train.labels, dtype=np.int64)
    spec = json.dumps(cfg["model"]["features"], sort_keys=True)
    request = digest("features", hospital.train.images.tobytes(), labels.tobytes(), spec,
                     str(plan.feature_noise), str(plan.enabled))  # fmt: skip
    answered = ledger.answered("features", request)
    if answered:
        return np.load(io.BytesIO(answered))
    noise = plan.feature_noise if plan.enabled else 0.0
    sums = noisy_feature_sums(model.feature_map, hospital.train.images, labels, n_classes, noise)
    rows = release_rows(sums, shares * len(labels), len(labels))
    release = _one_shot_release(ledger, plan, plan.feature_release, "the feature-sum release")
    buffer = io.BytesIO()
    np.save(buffer, rows, allow_pickle=False)
    ledger.commit("features", request, release, buffer.getvalue(), run=run)
    return rows


def _train_reply(msg: Message, hospital: Hospital, weights: dict, metrics: dict) -> Message:
    content = RecordDict(
        {
            messages.ARRAYS: messages.to_record(weights),
            messages.METRICS: MetricRecord(metrics),
            messages.HOSPITAL: ConfigRecord({"name": hospital.name}),
        }
    )
    return Message(content=content, reply_to=msg)


def _label_shares(
    ledger: Ledger, hospital: Hospital, n_classes: int, plan: PrivacyPlan, run: str
) -> np.ndarray:
    """The hospital's noisy class shares: released once for its data (recorded in the
    ledger before anything derived from them leaves), the same ones ever after."""
    labels = np.asarray(hospital.train.labels, dtype=np.int64)
    request = digest("labels", labels.tobytes(), str(n_classes), str(plan.label_noise))
    answered = ledger.answered("labels", request)
    if answered:
        return np.asarray(json.loads(answered), dtype=np.float64)
    shares = noisy_class_shares(labels, n_classes, plan)
    release = _one_shot_release(ledger, plan, plan.label_release, "the class-count release")
    ledger.commit("labels", request, release, json.dumps(shares.tolist()).encode(), run=run)
    return shares


def _one_shot_release(ledger: Ledger, plan: PrivacyPlan, release, what: str) -> tuple:
    """The ledger entry of a one-shot release (``release()`` gives it under DP), refused
    with BudgetExceeded if it would pass the budget; with DP off, exact values: no
    guarantee, recorded as such."""
    if not plan.enabled:
        return (0.0, 1.0, 1)
    entry = release()
    if ledger.epsilon([*ledger.history(), entry]) > plan.target_epsilon + 1e-9:
        raise BudgetExceeded(f"{what} would pass the budget")
    return entry
