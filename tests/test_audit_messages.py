"""What a hospital sends back from the audit query: aggregates only.

The real ClientApp is called with a real ``query.audit`` Flower message; its reply is
inspected record by record. Two hospitals of very different sizes must send records of
the same shape: nothing in them grows with the number of images.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedtwin.client.client_app import make_client_app
from fedtwin.config import load_config
from fedtwin.data import Split, make_hospitals
from fedtwin.metrics import train_classifier
from fedtwin.server import messages
from fedtwin.server.audited_twin import AUDIT_PARAMETERS
from fedtwin.tensors import get_weights
from fedtwin.utility import SCORE_BINS


@pytest.fixture(scope="module")
def replies(data_path):
    """Two unequal hospitals answer the audit query (without eval.hybrid's own classifiers:
    ``hybrid_replies`` has those)."""
    return ask_two_hospitals(data_path, load_config(["eval.hybrid=false"]))


@pytest.fixture(scope="module")
def hybrid_replies(data_path):
    return ask_two_hospitals(data_path, load_config(["eval.epochs=1"]))


def ask_two_hospitals(data_path, cfg):
    d = np.load(data_path)
    data = Split(d["train_images"][:900].copy(), d["train_labels"][:900, 0].astype(np.int64))
    hospitals = make_hospitals(data, 2, "iid", 0.5, 0.25, seed=0)
    # make the two hospitals very unequal: the second keeps a fifth of its images
    small = hospitals[1]
    hospitals[1] = type(small)(
        small.name, small.train.subset(np.arange(120)), small.holdout.subset(np.arange(40))
    )
    twin = np.random.default_rng(0).integers(0, 256, (80, 28, 28), dtype=np.uint8)
    twin_labels = np.arange(80) % 2
    clf = train_classifier(twin, twin_labels, 2, epochs=1, batch_size=32, lr=1e-3, seed=0)
    app = make_client_app(cfg, lambda ctx: hospitals[int(ctx.node_config["partition-id"])])
    out = []
    for i in range(2):
        content = RecordDict(
            {
                messages.TWIN: messages.to_record({"images": twin, "labels": twin_labels}),
                messages.CLASSIFIER: messages.to_record(get_weights(clf)),
                messages.AUDIT: ConfigRecord({k: cfg["audit"][k] for k in AUDIT_PARAMETERS}),
            }
        )
        meta = Metadata(
            run_id=1,
            message_id=f"query-{i}",
            src_node_id=0,
            dst_node_id=i + 1,
            reply_to_message_id="",
            group_id="audit",
            created_at=time.time(),
            ttl=600.0,
            message_type=messages.AUDIT_QUERY,
        )
        context = Context(
            run_id=1,
            node_id=i + 1,
            node_config={"partition-id": i},
            state=RecordDict(),
            run_config={},
        )
        out.append(app(Message(content=content, metadata=meta), context))
    return hospitals, cfg, out


def test_reply_holds_only_counts_and_fixed_size_histograms(replies):
    hospitals, cfg, out = replies
    bins = int(cfg["audit"]["bins"])
    allowed_lengths = {bins, len(SCORE_BINS) - 1}
    for h, reply in zip(hospitals, out, strict=True):
        assert not reply.has_error()
        assert set(reply.content.keys()) == {messages.AUDIT, messages.UTILITY, messages.HOSPITAL}
        assert not any(isinstance(r, ArrayRecord) for r in reply.content.values())
        assert dict(reply.content[messages.HOSPITAL]) == {"name": h.name}
        for record in (messages.AUDIT, messages.UTILITY):
            for key, value in reply.content[record].items():
                if isinstance(value, list):
                    assert len(value) in allowed_lengths, key
                    assert all(isinstance(v, int) and v >= 0 for v in value), key
                else:
                    assert isinstance(value, int), key  # counts, never a per-image value


def test_record_shapes_do_not_depend_on_the_hospital(replies):
    hospitals, _, out = replies
    assert len(hospitals[0].train) > 2 * len(hospitals[1].train)
    shapes = []
    for reply in out:
        shapes.append(
            {
                (rec, k): len(v) if isinstance(v, list) else None
                for rec in (messages.AUDIT, messages.UTILITY)
                for k, v in reply.content[rec].items()
            }
        )
    assert shapes[0] == shapes[1]


def test_histograms_count_each_image_once(replies):
    hospitals, _, out = replies
    for h, reply in zip(hospitals, out, strict=True):
        audit = messages.unflatten(dict(reply.content[messages.AUDIT]))
        mia = audit["mia"]["gan_leaks_pixel"]
        assert mia["members"].sum() == audit["n_train"]
        assert mia["nonmembers"].sum() == audit["n_holdout"]
        assert audit["dcr"]["pixel"]["twin"].sum() == audit["n_twin"] == 80
        utility = messages.unflatten(dict(reply.content[messages.UTILITY]))
        assert utility["n"] == len(h.holdout)


def test_the_hospitals_own_classifiers_send_only_counts_and_fixed_size_histograms(
    hybrid_replies,
):
    hospitals, cfg, out = hybrid_replies
    assert cfg["eval"]["hybrid"]
    for h, reply in zip(hospitals, out, strict=True):
        assert not reply.has_error()
        own = {messages.UTILITY_REAL, messages.UTILITY_HYBRID}
        assert set(reply.content.keys()) == {
            messages.AUDIT, messages.UTILITY, messages.HOSPITAL, messages.TWO_SAMPLE, *own
        }  # fmt: skip
        test = reply.content[messages.TWO_SAMPLE]  # the realism test: counts, histograms, AUC
        assert set(test.keys()) == {"real", "twin", "n_real", "n_twin", "n_fit", "auc"}
        assert test["n_real"] == test["n_twin"] <= len(h.holdout)
        for side in ("real", "twin"):
            assert len(test[side]) == len(SCORE_BINS) - 1 and sum(test[side]) == test[f"n_{side}"]
            assert all(isinstance(v, int) and v >= 0 for v in test[side])
        assert isinstance(test["auc"], float) and 0.0 <= test["auc"] <= 1.0
        for record in own:
            assert reply.content[record]["n"] == len(h.holdout)
            for key, value in reply.content[record].items():
                if isinstance(value, list):
                    assert len(value) == len(SCORE_BINS) - 1, key
                    assert all(isinstance(v, int) and v >= 0 for v in value), key
                else:
                    assert isinstance(value, int), key
