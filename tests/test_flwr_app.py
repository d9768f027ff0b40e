"""The one Flower app of the repository's ``pyproject.toml``: ``flwr run .`` on Flower's
Simulation Engine (a real SuperLink process on 127.0.0.1, the ``flwr`` CLI), and the run
config that reaches the app."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtwin.config import config_from_run, load_config
from fedtwin.ledger import Ledger
from fedtwin.localnet import simulation
from fedtwin.signing import verify_twin

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
APP = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]


def flat(tree: dict, prefix: str = "") -> dict:
    """Nested TOML tables as Flower's run config: dotted keys."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_apps_run_config_holds_confs_defaults_and_no_preset_changes_them():
    """A run config key beats a preset, so the app's own keys must be ones no preset sets."""
    settings = {k: v for k, v in flat(APP["config"]).items() if k not in ("out", "overrides")}
    assert settings, "the run config names no setting"
    presets = [p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")]
    assert presets
    for overrides in [[], *[[f"+experiment={p}"] for p in presets]]:
        cfg = load_config(overrides)
        for key, value in settings.items():
            *groups, name = key.split(".")
            tree = cfg
            for group in groups:
                tree = tree[group]
            assert tree[name] == value, (overrides, key)


def test_dotted_run_config_keys_and_overrides_reach_the_settings():
    cfg = config_from_run(
        {"out": "x", "overrides": "+experiment=tiny", "federation.rounds": 7,
         "privacy.enabled": False, "data.path": "/srv/a b.npz", "privacy.delta": 1e-6}
    )  # fmt: skip
    assert cfg["federation"]["rounds"] == 7  # a key beats the preset
    assert cfg["federation"]["local_steps"] == 3  # the preset
    assert cfg["privacy"]["enabled"] is False and cfg["privacy"]["delta"] == 1e-6
    assert cfg["data"]["path"] == "/srv/a b.npz"


def test_an_unknown_run_config_key_is_named():
    with pytest.raises(ValueError, match="federation.roundz"):
        config_from_run({"federation.roundz": 3})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flwr_run_dot_simulates_the_tiny_federation_to_a_signed_twin(tmp_path, data_path):
    """The README's command, against a simulation SuperLink on a free port: two simulated
    hospitals train, the twin is audited at them and signed, each ledger holds its rounds."""
    c = simulation(tmp_path)
    out = tmp_path / "out"
    overrides = (
        f"+experiment=tiny data.path={data_path} federation.rounds=1 model.features=null "
        "twin.size=100 twin.dicom=false eval.hybrid=false audit.override=tiny-run"
    )
    run_config = f"out='{out}' overrides='{overrides}' privacy.epsilon=8.0"
    try:
        run_id = c.flwr_run(ROOT, out, "--run-config", run_config,
                            "--federation-config", "num-supernodes=2")  # fmt: skip
        run = c.wait_run(run_id, 540)
    finally:
        c.stop()
    assert run["status"] == "finished:completed", run["logs"][-4000:]

    history = json.loads((out / "history.json").read_text())["rounds"]
    assert [e["round"] for e in history] == [1]
    names = {"hospital-0", "hospital-1"}
    assert all(set(e["hospitals"]) == names for e in history)
    for name in names:
        ledger = Ledger(out / "ledgers" / f"{name}.sqlite", delta=1e-5)
        assert [e.kind for e in ledger.entries()] == ["labels", "train"]
        assert ledger.epsilon() == pytest.approx(history[-1]["hospitals"][name]["epsilon"])
        assert 7.0 < ledger.epsilon() <= 8.0  # the run config's budget, planned in full
    manifest = json.loads((out / "twin" / "manifest.json").read_text())
    assert manifest["size"] == 100 and manifest["gate"]["signed"]
    assert verify_twin(out / "twin").ok


def test_the_demo_shows_a_line_per_round():
    from fedtwin.server.simulation import round_line

    entry = {
        "round": 3,
        "hospitals": {
            "hospital-0": {"epsilon": 6.5, "loss_d": 1.0, "loss_g": 2.0},
            "hospital-1": {"epsilon": 6.1, "loss_d": 3.0, "loss_g": 4.0},
        },
        "refused": [{"reason": "hospital-2: budget"}],
    }
    line = round_line(entry, 5)
    assert line == "round 3/5: 2 hospitals, epsilon <= 6.50, loss_d 2.000, loss_g 3.000, 1 refused"
    assert round_line({"round": 0, "hospitals": {}}, 5) == "feature release: 0 hospitals"
