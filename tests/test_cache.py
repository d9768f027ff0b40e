"""fedtwin.cache: computed values kept on disk give the same answer, and a damaged or
unwritable cache only costs the computation."""

from __future__ import annotations

import json
import math

import pytest

from fedtwin import cache, privacy


def test_a_calibrated_noise_level_is_computed_once_and_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTWIN_CACHE", str(tmp_path))
    calls = []

    @cache.remembered("v1")
    def slow(x: float, *, prior: tuple = ()) -> float:
        calls.append(x)
        return x * 2 + len(prior)

    assert slow(1.5, prior=((1.0, 0.1, 3),)) == 4.0
    assert slow(1.5, prior=((1.0, 0.1, 3),)) == 4.0 and calls == [1.5]  # from disk
    assert slow(2.5) == 5.0 and calls == [1.5, 2.5]  # another question
    for stored in (tmp_path / "computed").glob("*.json"):
        stored.write_text("{not json")  # damaged: computed again, and rewritten
    assert slow(1.5, prior=((1.0, 0.1, 3),)) == 4.0 and calls == [1.5, 2.5, 1.5]

    def other(x: float, *, prior: tuple = ()) -> float:
        calls.append(-x)
        return 0.0

    other.__qualname__ = slow.__wrapped__.__qualname__  # the same question ...
    assert cache.remembered("v2")(other)(1.5, prior=((1.0, 0.1, 3),)) == 0.0  # ... other code
    assert calls[-1] == -1.5 and len(list((tmp_path / "computed").glob("*.json"))) == 3


def test_an_unwritable_cache_is_ignored(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("FEDTWIN_CACHE", str(blocked))  # a file, not a folder
    assert cache.remembered("v")(lambda x: x + 1)(1) == 2


def test_the_plan_from_the_cache_equals_a_fresh_calibration(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTWIN_CACHE", str(tmp_path))
    args = (8.0, 1e-5, 0.1, 30, ((10.0, 1.0, 1),), "rdp")
    fresh = privacy._calibrated_sigma.__wrapped__.__wrapped__(*args)  # no cache at all
    privacy._calibrated_sigma.cache_clear()
    first = privacy._calibrated_sigma(*args)  # computed, written
    privacy._calibrated_sigma.cache_clear()
    again = privacy._calibrated_sigma(*args)  # read back from disk
    assert fresh == first == again
    assert len(list((tmp_path / "computed").glob("*.json"))) == 1
    assert privacy.epsilon_spent([(10.0, 1.0, 1), (again, 0.1, 30)], 1e-5) <= 8.0
    with pytest.raises(ValueError, match="reaches epsilon"):
        privacy._calibrated_sigma(1e-9, 1e-5, 1.0, 10**6, (), "rdp")


def _store(folder, value) -> None:
    """Overwrite every stored value under ``folder`` (a damaged or hostile cache)."""
    for stored in (folder / "computed").glob("*.json"):
        entry = json.loads(stored.read_text())
        stored.write_text(json.dumps({**entry, "value": value}))


def test_a_stored_noise_level_that_does_not_meet_the_budget_is_computed_again(
    tmp_path, monkeypatch
):
    """A cached value is a hint: NaN, negative, infinite or too little noise is recomputed
    and overwritten, never used (NaN made a hospital spin forever in the budget check)."""
    monkeypatch.setenv("FEDTWIN_CACHE", str(tmp_path))
    args = (8.0, 1e-5, 0.1, 30, ((10.0, 1.0, 1),), "rdp")
    privacy._calibrated_sigma.cache_clear()
    fresh = privacy._calibrated_sigma(*args)
    for bad in (math.nan, -fresh, math.inf, fresh / 2, "1.5x"):
        _store(tmp_path, bad)
        privacy._calibrated_sigma.cache_clear()
        assert privacy._calibrated_sigma(*args) == fresh, bad
        [stored] = (tmp_path / "computed").glob("*.json")
        assert json.loads(stored.read_text())["value"] == fresh  # overwritten
    _store(tmp_path, fresh + 1.0)  # more noise than needed still meets the budget: kept
    privacy._calibrated_sigma.cache_clear()
    assert privacy._calibrated_sigma(*args) == fresh + 1.0
    privacy._calibrated_sigma.cache_clear()


def test_a_stored_feature_noise_that_spends_too_much_is_computed_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTWIN_CACHE", str(tmp_path))
    question = {"epsilon": 4.0, "delta": 1e-5, "label_noise": 10.0, "accountant": "rdp"}
    privacy.feature_noise_for.cache_clear()
    fresh = privacy.feature_noise_for(0.5, **question)
    for bad in (math.nan, -1.0, fresh / 2):
        _store(tmp_path, bad)
        privacy.feature_noise_for.cache_clear()
        assert privacy.feature_noise_for(0.5, **question) == fresh, bad
    privacy.feature_noise_for.cache_clear()


@pytest.mark.timeout(60)
def test_the_budget_check_refuses_a_nan_or_negative_noise_at_once():
    """Opacus's series never ends for a NaN noise; the check refuses it instead."""
    for sigma in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError, match="history entry"):
            privacy.epsilon_spent([(sigma, 0.1, 10)], 1e-5)
        plan = privacy.PrivacyPlan(True, 8.0, 1e-5, 1.0, 0.1, 10, sigma, "rdp", 10.0)
        with pytest.raises(ValueError, match="damaged"):
            privacy.check_budget(plan, [(10.0, 1.0, 1)], 10)
