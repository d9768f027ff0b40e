"""Hospital side: a Flower ClientApp that adapts the core.

- ``train``: each round it receives the global weights, runs the hospital's DP local round
  (``fedtwin.training.local_round``), records the privacy spent in the node's persistent
  state (the ClientApp object itself is rebuilt every round, the node state is not) and
  sends back weights, example count and epsilon.
- ``query.audit``: after training it receives the candidate twin and a classifier trained
  on it, runs the privacy audit (``fedtwin.audit.site_audit``) and the utility scoring
  (``fedtwin.utility.site_utility``) on its own images, and sends back aggregates only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedtwin import messages
from fedtwin.audit import site_audit
from fedtwin.data import Hospital
from fedtwin.metrics import Classifier, features
from fedtwin.models import build_model
from fedtwin.privacy import noisy_class_shares, plan_from_config
from fedtwin.training import local_round, set_weights
from fedtwin.utility import site_utility

PRIVACY_STATE = "privacy-history"
OPTIMIZER_STATE = "optimizer-state"  # Adam moments, local only: the next round resumes them
LABEL_STATE = "label-shares"  # the hospital's noisy class shares, released once


def round_seed(seed: int, hospital: str, server_round: int) -> int:
    digest = hashlib.sha256(f"{seed}:{hospital}:{server_round}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _optimizer_state(context: Context) -> bytes:
    record = context.state.get(OPTIMIZER_STATE)
    return bytes(record["state"]) if record is not None else b""


def make_client_app(cfg: dict, load_hospital: Callable[[Context], Hospital]) -> ClientApp:
    """A ClientApp for one consortium run.

    ``cfg`` is the resolved run config (plain dict); ``load_hospital`` gives the hospital's
    own data for the node running the app (its archive in deployment, its partition in
    simulation). The hospital's budget (``privacy.*``) is read here, on the hospital's side.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(int(cfg.get("threads_per_hospital", 1)))
        hospital = load_hospital(context)
        fed = cfg["federation"]
        server = msg.content[messages.CONFIG]
        steps, batch = int(server["local-steps"]), int(fed["batch_size"])
        plan = plan_from_config(
            cfg["privacy"],
            n_train=len(hospital.train),
            batch_size=batch,
            # The hospital plans for the rounds it agreed to; the server cannot stretch it.
            total_steps=int(fed["rounds"]) * int(fed["local_steps"]),
        )
        history = messages.history_from_record(context.state.get(PRIVACY_STATE))
        n_classes = len(cfg["data"]["classes"])
        if LABEL_STATE in context.state:
            shares = np.asarray(context.state[LABEL_STATE]["shares"], dtype=np.float64)
        else:
            # Released once per federation, recorded before anything derived from it leaves.
            shares = noisy_class_shares(hospital.train.labels, n_classes, plan)
            if plan.enabled:
                history = [*history, plan.label_release()]
            context.state[LABEL_STATE] = ConfigRecord({"shares": shares.tolist()})
            context.state[PRIVACY_STATE] = messages.history_to_record(history)

        model = build_model(cfg["model"], n_classes, cfg["data"]["image_size"])
        model.label_prior = torch.as_tensor(shares, dtype=torch.float32)
        set_weights(model, messages.from_record(msg.content[messages.ARRAYS]))
        result = local_round(
            model,
            hospital.train.images,
            hospital.train.labels,
            plan,
            steps=steps,
            batch_size=batch,
            history=history,
            seed=round_seed(int(cfg["seed"]), hospital.name, int(server["server-round"])),
            device=str(cfg.get("device_resolved", "cpu")),
            optimizer_state=_optimizer_state(context),
        )
        # Record the privacy spent before the weights leave this node.
        context.state[PRIVACY_STATE] = messages.history_to_record(result.history)
        context.state[OPTIMIZER_STATE] = ConfigRecord({"state": result.optimizer_state})
        content = RecordDict(
            {
                messages.ARRAYS: messages.to_record(result.weights),
                messages.METRICS: messages.round_metrics(
                    result.num_examples, result.epsilon, result.steps, result.losses, shares
                ),
                messages.HOSPITAL: ConfigRecord({"name": hospital.name}),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.query("audit")
    def audit(msg: Message, context: Context) -> Message:
        torch.set_num_threads(int(cfg.get("threads_per_hospital", 1)))
        hospital = load_hospital(context)
        twin = msg.content[messages.TWIN]["images"].numpy()
        classifier = Classifier(len(cfg["data"]["classes"]))
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
        utility = site_utility(classifier, hospital.holdout.images, hospital.holdout.labels)
        content = RecordDict(
            {
                messages.AUDIT: MetricRecord(messages.flatten(site)),
                messages.UTILITY: MetricRecord(messages.flatten(utility)),
                messages.HOSPITAL: ConfigRecord({"name": hospital.name}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app
