"""Secure aggregation (SecAgg+, on by default): the server-side code never holds one
hospital's update. Every message the ServerApp receives is recorded; none carries weights,
the masked vectors it does get are unrelated to each hospital's update (taken from the
hospital's own ledger), and what it ends with is their example-weighted average."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fedtwin.client.client_app import make_client_app
from fedtwin.server.server_app import train_and_publish
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from fedtwin import messages
from fedtwin.config import load_config
from fedtwin.data import Split, make_hospitals
from fedtwin.ledger import Ledger

pytestmark = pytest.mark.slow


class RecordingGrid:
    """The Grid the ServerApp is given, keeping a copy of every reply it hands over."""

    def __init__(self, grid):
        self.grid, self.replies = grid, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies += replies
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


def test_the_server_only_ever_holds_the_sum(small_real, tmp_path):
    images, labels = small_real
    hospitals = make_hospitals(Split(images, labels), 3, "dirichlet", 1.0, 0.2, seed=0)
    cfg = load_config(
        ["+experiment=tiny", "federation.hospitals=3", "federation.rounds=1", "twin.size=40",
         "twin.dicom=false", "audit.override=secure-aggregation-test"]
    )  # fmt: skip
    assert cfg["federation"]["secure_aggregation"]  # the default
    grids = []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        grids.append(RecordingGrid(grid))
        train_and_publish(grids[0], context, cfg, tmp_path)

    run_simulation(
        server_app=server,
        client_app=make_client_app(
            cfg,
            lambda ctx: hospitals[int(ctx.node_config["partition-id"])],
            lambda ctx, h: tmp_path / "ledgers" / f"{h.name}.sqlite",
        ),
        num_supernodes=3,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": 2, "include_dashboard": False}},
    )  # fmt: skip
    (entry,) = json.loads((tmp_path / "history.json").read_text())["rounds"]
    assert entry["secure_aggregation"] == {"summed": 3, "dropped": 0}
    names = list(entry["hospitals"])
    assert len(names) == 3

    # What each hospital really sent into the protocol: its ledger's committed reply.
    sent, counts = {}, {}
    for name in names:
        ledger = Ledger(tmp_path / "ledgers" / f"{name}.sqlite", delta=1e-5)
        (e,) = [e for e in ledger.entries() if e.kind == "train"]
        sent[name], metrics = messages.unpack_reply(ledger.answered("train", e.request))
        counts[name] = metrics["num-examples"]

    train_replies = [m for m in grids[0].replies if m.metadata.message_type == "train"]
    assert len(train_replies) == 4 * 3  # four SecAgg+ stages, three hospitals
    for msg in train_replies:  # no training reply carries an array of floats
        assert all(len(record) == 0 for record in msg.content.array_records.values())

    masked = {}
    for msg in train_replies:
        configs = msg.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            hospital = str(msg.content.config_records["fitres.metrics"]["hospital"])
            arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
            masked[hospital] = np.concatenate([a.ravel() for a in arrays[1:]])  # [0]: weight
    assert set(masked) == set(names)
    secagg = cfg["federation"]["secagg"]
    clip, levels = float(secagg["clipping_range"]), 2**22
    for name in names:  # the masked vector says nothing about the update it hides
        ratio = counts[name] / float(secagg["max_examples"])
        flat = np.concatenate([w.ravel() for w in sent[name].values()]).astype(np.float64)
        quantized = (flat * ratio + clip) * levels / (2 * clip)
        corr = np.corrcoef(masked[name].astype(np.float64), quantized)[0, 1]
        assert abs(corr) < 0.05, (name, corr)
    total = sum(m.astype(np.int64) for m in masked.values()) % 2**32
    assert np.std(total / 2**32) > 0.25  # their sum still hides the private masks: noise

    # What the server ends with: the example-weighted average of what was sent.
    saved = torch.load(tmp_path / "checkpoints" / "round-001.pt")["weights"]
    keys = list(saved)
    final = np.concatenate([saved[k].numpy().ravel() for k in keys]).astype(np.float64)
    own = {n: np.concatenate([sent[n][k].ravel() for k in keys]).astype(np.float64) for n in names}
    average = sum(own[n] * counts[n] for n in names) / sum(counts.values())
    error = np.abs(final - average).max()
    print(f"largest difference from the weighted average: {error:.2e}")
    assert error < 1e-3  # SecAgg+ quantization
    for n in names:  # and it is none of the hospitals' own updates
        assert np.abs(final - own[n]).max() > 100 * error
    assert (tmp_path / "twin" / "manifest.json").is_file()
