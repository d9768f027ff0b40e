"""fedtwin.schema's ranges, applied by fedtwin.config.check_config: every numeric setting
has one, and a value outside it (or one no generator can use) is one line naming the
setting and what to give, before anything starts (no Flower, no Ray, nothing written)."""

from __future__ import annotations

import pytest

from fedtwin.cli import main
from fedtwin.config import check_config, load_config
from fedtwin.data import DataError, load_npz
from fedtwin.medmnist import resolve_data_path
from fedtwin.schema import RANGES


@pytest.mark.parametrize(
    "overrides, says",
    [
        (["data.image_size=37"], "data.image_size=37: the DCGAN halves it 3 times"),
        (["model=ddpm", "data.image_size=30"], "data.image_size=30: the diffusion UNet"),
        (["data.image_size=100000"], "data.image_size=100000: must be a whole number from 8"),
        (["twin.size=1000000000"], "twin.size=1000000000: must be a whole number from 1 to"),
        (["federation.rounds=100000000"], "federation.rounds=100000000: must be a whole"),
        (["federation.hospitals=1000000"], "federation.hospitals=1000000: must be"),
        (["model.lr_g=nan"], "model.lr_g=nan: must be a number in (0, 10]"),
        (["model.lr_d=1e9"], "model.lr_d=1000000000.0: must be a number in (0, 10]"),
        (["model=ddpm", "model.lr=-1"], "model.lr=-1.0: must be a number in (0, 10]"),
        (["model.beta1=1"], "model.beta1=1.0: must be a number in [0, 1)"),
        (["eval.lr=0"], "eval.lr=0.0: must be a number in (0, 10]"),
        (["eval.seeds=[]"], "eval.seeds=[]: must be a list of one or more values"),
        (["eval.seeds=[-1]"], "eval.seeds=[-1]: must be a list of one or more values"),
        (["audit.bins=-1"], "audit.bins=-1: must be a whole number from 2"),
        (["audit.copy_margin=0.9"], "audit.copy_margin=0.9: must be a number in (0, 0.5]"),
        (["audit.copy_coarse=64"], "audit.copy_coarse=64: larger than data.image_size=28"),
        (["privacy.label_noise=0"], "privacy.label_noise=0.0: must be a number in (0,"),
        (["federation.secagg.timeout_s=-1"], "federation.secagg.timeout_s=-1.0: must be"),
        (["model.features.scales=[3]"], "model.features.scales: 3 does not divide"),
        (["model=ddpm", "model.sample_steps=2000"], "model.sample_steps=2000: more than"),
        (["seed=abc"], "seed='abc': must be a whole number from 0 to 4294967295"),
        (["seed=-1"], "seed=-1: must be a whole number from 0"),
        (["data.classes=[a]"], "data.classes=['a']: must be a list of two or more"),
        (["data.classes=[a,a]"], "data.classes=['a', 'a']: must be a list of two or more"),
        (["data.path=/dev/zero"], "data.path='/dev/zero': is not a regular file or folder"),
    ],
)
def test_a_value_out_of_range_is_refused_naming_the_setting(overrides, says):
    with pytest.raises(ValueError) as e:
        check_config(load_config(overrides))
    assert str(e.value).startswith(f"config: {says}") and "\n" not in str(e.value)


def _numbers(tree: dict, prefix: str = ""):
    """The dotted names of every numeric setting (lists of numbers too) in ``tree``."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            if key != "sources":  # data.sources: image size -> url, not a setting to range
                yield from _numbers(value, name + ".")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield name
        elif isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            yield name


@pytest.mark.parametrize("overrides", [[], ["model=ddpm"]])
def test_every_numeric_setting_has_a_range(overrides):
    cfg = load_config(overrides)
    unranged = sorted(set(_numbers(cfg)) - set(RANGES) - {"data.channels"})  # a choice
    assert not unranged, f"add these to fedtwin.schema.RANGES: {unranged}"


def test_demo_refuses_an_image_size_before_anything_starts(tmp_path, capsys):
    """It started Flower and Ray and died 37 s later in tracebacks."""
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out), "data.image_size=37", "twin.size=nan"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtwin demo: error: config: twin.size=nan") and err.count("\n") == 1
    assert main(["demo", "--out", str(out), "data.image_size=37"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtwin demo: error: config: data.image_size=37: the DCGAN")
    assert "Traceback" not in err and not out.exists()


def test_hospitals_make_refuses_a_negative_seed_naming_it(tmp_path, capsys):
    out = tmp_path / "archives"
    with pytest.raises(SystemExit) as e:
        main(["hospitals", "make", "--source", "x.npz", "--out", str(out), "--seed", "-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --seed: '-1': must be a whole number from 0" in err
    assert not out.exists()


def test_a_device_as_data_path_is_not_called_missing():
    with pytest.raises(DataError, match="/dev/zero: not a regular file"):
        load_npz("/dev/zero")
    with pytest.raises(DataError, match="data.path=/dev/zero: not a regular file or folder"):
        resolve_data_path({"path": "/dev/zero"})
