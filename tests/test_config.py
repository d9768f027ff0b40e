"""fedtwin.config: a mistyped override or a setting no run could use is one clear line,
before anything starts."""

from __future__ import annotations

import pytest

from fedtwin.cli import main
from fedtwin.config import check_config, load_config


@pytest.mark.parametrize(
    "override, key",
    [
        ("privacy.epsilon=-1", "privacy.epsilon"),
        ("privacy.epsilon=0", "privacy.epsilon"),
        ("privacy.epsilon=nan", "privacy.epsilon"),
        ("privacy.delta=2", "privacy.delta"),
        ("privacy.delta=0", "privacy.delta"),
        ("federation.rounds=0", "federation.rounds"),
        ("federation.local_steps=0", "federation.local_steps"),
        ("federation.batch_size=0", "federation.batch_size"),
        ("federation.rounds=many", "federation.rounds"),
        ("federation.min_hospitals=5", "federation.min_hospitals"),
        ("twin.size=0", "twin.size"),
        ("twin.checkpoints=0", "twin.checkpoints"),
        ("privacy.accountant=moments", "privacy.accountant"),
        ("privacy.max_grad_norm=-1", "privacy.max_grad_norm"),
        ("privacy.feature_share=1", "privacy.feature_share"),
        ("federation.warm_start_steps=-5", "federation.warm_start_steps"),
        ("+twin.class_weights.pneumonia=0", "twin.class_weights"),
        ("+twin.class_weights.cancer=3", "twin.class_weights"),
    ],
)
def test_a_setting_no_run_could_use_is_refused_naming_it(override: str, key: str) -> None:
    with pytest.raises(ValueError) as e:
        check_config(load_config([override]))
    message = str(e.value)
    assert message.startswith(f"config: {key}=") and "\n" not in message


def test_every_wrong_setting_is_named_in_one_line() -> None:
    cfg = load_config(["privacy.epsilon=-1", "federation.rounds=0", "twin.size=0"])
    with pytest.raises(ValueError, match="privacy.epsilon.*federation.rounds.*twin.size"):
        check_config(cfg)


def test_the_shipped_settings_and_a_baseline_without_dp_pass() -> None:
    check_config(load_config())
    check_config(load_config(["+experiment=tiny", "model=ddpm"]))
    check_config(load_config(["privacy.enabled=false", "privacy.epsilon=inf"]))


def test_demo_refuses_a_bad_setting_before_anything_starts(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "privacy.delta=2", "federation.min_hospitals=9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtwin demo: error: config: privacy.delta=2") and err.count("\n") == 1
    assert "federation.min_hospitals=9: more than federation.hospitals=4" in err
    assert not out.exists()


@pytest.mark.parametrize(
    "override, says",
    [
        ("privacy.epsilno=3", "privacy.epsilno=3: no such setting; did you mean privacy.epsilon"),
        ("model=foo", "model=foo: no such model; choose one of dcgan, ddpm"),
        ("mdoel=dcgan", "mdoel=dcgan: no such setting; did you mean model?"),
        ("+experiment=tiyn", "+experiment=tiyn: no such experiment; choose tiny"),
        ("federation.rounds", "'federation.rounds': not a valid override; write key=value"),
    ],
)
def test_a_mistyped_override_names_the_key_and_the_nearest(override, says, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "run"), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedtwin demo: error: {says}") and err.count("\n") == 1


def test_deploy_app_refuses_bad_overrides_before_writing_the_app(tmp_path, capsys) -> None:
    app = tmp_path / "app"
    args = ["deploy", "app", "--dir", str(app), "--out", str(tmp_path / "out")]
    assert main([*args, "--overrides", "federation.rounds=0"]) == 2
    assert "federation.rounds=0" in capsys.readouterr().err
    assert not (app / "pyproject.toml").exists()


@pytest.mark.parametrize(
    "override, says",
    [
        ("privacy.enabled=maybe", "privacy.enabled=maybe: Value 'maybe' is not a valid bool"),
        ("federation.secagg.max_examples=x", "federation.secagg.max_examples=x: Value 'x'"),
        ("model.width=wide", "model.width=wide: Value 'wide'"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_when_the_config_is_composed(override, says):
    """fedtwin/schema.py types every key of every group, nested ones and each model's own."""
    overrides = ["model=ddpm", override] if override.startswith("model.") else [override]
    with pytest.raises(ValueError) as e:
        load_config(overrides)
    assert str(e.value).startswith(f"config: {says}") and "\n" not in str(e.value)
