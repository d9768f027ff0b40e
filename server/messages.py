"""What travels between hospitals and the server, in Flower's record types.

The consortium defines the protocol, so it lives with the server; the ClientApp imports it
too, so the message layout is written down once. The core (``fedtwin/``) knows nothing of
Flower: the apps convert to and from plain numpy arrays and dicts here.
"""

from __future__ import annotations

import io
import json
import math
from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

ARRAYS = "arrays"  # the generator's weights (FedAvg's default key)
CONFIG = "config"  # server -> hospital: what this round asks for
METRICS = "metrics"  # hospital -> server: counts, losses, epsilon spent
HOSPITAL = "hospital"  # hospital -> server: its public name
TASK = "task"  # in CONFIG: what a training message asks for (default: a training round)
RELEASE = "release"  # TASK before round 1: the one-shot feature release (fedtwin.features)


def to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for name, arr in weights.items():
        record[name] = Array.from_numpy_ndarray(np.ascontiguousarray(arr))
    return record


def from_record(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((name, arr.numpy()) for name, arr in record.items())


def round_metrics(
    num_examples: int, epsilon: float, steps: int, losses: dict, label_shares: np.ndarray
) -> MetricRecord:
    """A hospital's round summary. ``label_shares`` are its noisy class shares (released
    once under DP, see ``privacy.noisy_class_shares``): the server mixes the twin's labels
    from them. MetricRecord carries only finite numbers; DP off (epsilon = inf) is sent as -1.
    """
    eps = -1.0 if math.isinf(epsilon) else float(epsilon)
    return MetricRecord(
        {
            "num-examples": int(num_examples),
            "epsilon": eps,
            "steps": int(steps),
            "label-shares": [float(v) for v in label_shares],
            **losses,
        }
    )


def payload_bytes(content: RecordDict) -> int:
    """The bytes a message's content takes on the wire: Flower sends it as these objects
    (before HTTP framing and TLS)."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())


def pack_reply(weights: dict[str, np.ndarray], metrics: dict) -> bytes:
    """A training reply as bytes, for the hospital's ledger (``fedtwin.ledger``)."""
    buffer = io.BytesIO()
    meta = np.frombuffer(json.dumps(metrics).encode(), dtype=np.uint8)
    np.savez(buffer, **{f"w/{k}": v for k, v in weights.items()}, metrics=meta)
    return buffer.getvalue()


def unpack_reply(data: bytes) -> tuple[OrderedDict[str, np.ndarray], dict]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        weights = OrderedDict((k[2:], z[k]) for k in z.files if k.startswith("w/"))
        metrics = json.loads(z["metrics"].tobytes())
    return weights, metrics


def epsilon_from_metric(value: float) -> float:
    return math.inf if value < 0 else float(value)


# ---- after training: the audit query (server -> hospital -> server) ----------------------
AUDIT_QUERY = "query.audit"  # Flower message type; the ClientApp registers @app.query("audit")
TWIN = "twin"  # server -> hospital: the candidate twin (ArrayRecord "images", "labels")
CLASSIFIER = "classifier"  # server -> hospital: weights of the classifier trained on the twin
AUDIT = "audit"  # server -> hospital: audit parameters; hospital -> server: its aggregates
UTILITY = "utility"  # hospital -> server: the classifier's scores on its holdout (aggregates)
# hospital -> server, with eval.hybrid: the same scores of classifiers the hospital trained on
# its own images alone and on its own images plus the twin (does the twin help *me*?)
UTILITY_REAL = "utility-real"
UTILITY_HYBRID = "utility-hybrid"
# hospital -> server, with eval.hybrid: its two-sample test (fedtwin.realism.site_two_sample),
# a CNN trained here on its images against part of the twin: histograms of the scores of its
# holdout and of unseen twin images on shared bins, their counts and its AUC
TWO_SAMPLE = "two-sample"


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested dict of numbers and number arrays as one flat dict with ``/`` in the keys
    (what a MetricRecord holds)."""
    flat: dict = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "/"))
        elif isinstance(value, np.ndarray):
            flat[name] = value.tolist()
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = np.asarray(value) if isinstance(value, list) else value
    return tree
