"""The privacy audit: it catches a generator that copies, passes one that does not, and its
pooled figures equal a direct computation on all hospitals' data in one place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.metrics import roc_auc_score

from fedtwin import audit, audit_pool, histograms
from fedtwin.config import load_config
from fedtwin.data import Split, make_hospitals
from fedtwin.models.base import TwinGenerator
from fedtwin.ssim import ssim
from fedtwin.tensors import to_tensor
from fedtwin.twin import generate


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_config()["audit"]


@pytest.fixture(scope="module")
def hospitals(data_path):
    d = np.load(data_path)
    data = Split(d["train_images"][:900].copy(), d["train_labels"][:900, 0].astype(np.int64))
    return make_hospitals(data, 3, "dirichlet", 0.5, 0.25, seed=1)


class CopyingGenerator(TwinGenerator):
    """A test double that really copies: each sample is one of its training images."""

    name, n_classes, image_size = "copy", 2, 28

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        super().__init__()
        self.images, self.labels = to_tensor(images), torch.as_tensor(labels)

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        out = []
        for y in labels.tolist():
            pool = torch.nonzero(self.labels == y)[:, 0]
            out.append(self.images[pool[torch.randint(len(pool), (1,), generator=rng)]])
        return torch.cat(out)

    def private_module(self):
        raise NotImplementedError

    def make_optimizers(self):
        raise NotImplementedError

    def train_step(self, *args):
        raise NotImplementedError


def audit_all(twin, hospitals, cfg, embed=None):
    sites = {
        h.name: audit.site_audit(twin, h.train.images, h.holdout.images, cfg, embed=embed)
        for h in hospitals
    }
    return sites, audit_pool.pool(sites, cfg, twin.shape[1])


def noise_twin(hospitals, n: int, seed: int = 0) -> np.ndarray:
    """Images that are no real image: the mean training image plus strong noise."""
    mean = np.mean([h.train.images.mean(0) for h in hospitals], axis=0)
    noise = np.random.default_rng(seed).normal(0, 40, (n, *mean.shape))
    return np.clip(mean + noise, 0, 255).astype(np.uint8)


def test_copying_generator_fails(hospitals, cfg):
    images = np.concatenate([h.train.images for h in hospitals])
    labels = np.concatenate([h.train.labels for h in hospitals])
    gen = CopyingGenerator(images, labels)
    twin = generate(gen, np.random.default_rng(0).permutation(labels), seed=0)
    _, result = audit_all(twin, hospitals, cfg)
    assert result["verdict"] == "fail"
    assert result["near_copies"]["near_copies"] > 100
    assert result["mia"]["gan_leaks_pixel"]["auc"] > 0.75
    assert result["mia"]["gan_leaks_pixel"]["ci95"][0] > 0.6
    assert not next(c for c in result["checks"] if c["check"] == "near copies")["passed"]
    # each twin image is a training image at one of the three hospitals: identical (SSIM 1)
    # there, another patient at the other two
    assert len(hospitals) == 3 and result["ssim"]["twin_quantiles"]["0.95"] > 0.99
    assert result["ssim"]["twin_above_holdout_q99"] >= 1 / 3 - 1e-9


def test_twin_of_no_real_image_passes(hospitals, cfg):
    _, result = audit_all(noise_twin(hospitals, 400), hospitals, cfg)
    assert result["verdict"] == "pass", result["checks"]
    assert result["near_copies"]["near_copies"] == 0
    assert all(abs(r["auc"] - 0.5) < 0.1 for r in result["mia"].values())
    similarity = result["ssim"]
    assert similarity["twin_quantiles"]["0.99"] < similarity["holdout_quantiles"]["0.5"]
    assert similarity["twin_above_holdout_q99"] < 0.01


def test_pooled_equals_centralized(hospitals, cfg):
    """Pooled histograms give what scipy/sklearn give on all raw distances at once."""
    rng = np.random.default_rng(0)
    copies = np.concatenate([h.train.images[:15] for h in hospitals])  # some real copies
    noisy = copies + rng.normal(0, 8.0, copies.shape)  # copy ratios between 0 and 1
    noisy = np.clip(noisy, 0, 255).round().astype(np.uint8)
    twin = np.concatenate([noise_twin(hospitals, 300), copies, noisy])[rng.permutation(390)]

    def embed(x):
        return x.reshape(len(x), -1)[:, ::7].astype(float)  # a fixed feature map

    _, pooled = audit_all(twin, hospitals, cfg, embed=embed)

    def px(x):
        return x.reshape(len(x), -1) / 255.0

    def blocks(x):  # 28 x 28 -> 7 x 7 block means, the audit's coarse space
        assert cfg["copy_coarse"] == 7
        return x.reshape(len(x), 7, 4, 7, 4).mean((2, 4)).reshape(len(x), -1) / 255.0

    def copy_ratio(cand, train, space):
        d = cdist(space(cand), space(train))
        own = cdist(space(train), space(train))
        np.fill_diagonal(own, np.inf)
        spacing = own.min(1)
        spacing = np.maximum(spacing, np.quantile(spacing, 0.05))
        return d.min(1) / spacing[d.argmin(1)]

    def both(cand, train):
        return np.minimum(copy_ratio(cand, train, px), copy_ratio(cand, train, blocks))

    near, flagged, r_twin, r_hold = 0, 0, [], []
    d_twin, d_hold, member, nonmember, s_twin, s_hold = [], [], [], [], [], []
    for h in hospitals:
        train, hold, _ = audit.deduplicate(h.train.images, h.holdout.images)
        r_twin.append(both(twin, train))
        r_hold.append(both(hold, train))
        near += int(np.sum(r_twin[-1] < cfg["copy_margin"]))
        flagged += int(np.sum(r_hold[-1] < cfg["copy_margin"]))
        d_twin.append(cdist(px(twin), px(train)).min(1))
        d_hold.append(cdist(px(hold), px(train)).min(1))
        s_twin.append(ssim(twin, train[cdist(px(twin), px(train)).argmin(1)]))
        s_hold.append(ssim(hold, train[cdist(px(hold), px(train)).argmin(1)]))
        member.append(cdist(px(train), px(twin)).min(1))
        nonmember.append(cdist(px(hold), px(twin)).min(1))
    member, nonmember = np.concatenate(member), np.concatenate(nonmember)
    truth = np.r_[np.ones(len(member)), np.zeros(len(nonmember))]
    auc = roc_auc_score(truth, -np.r_[member, nonmember])

    r_twin = np.concatenate(r_twin)
    assert np.sum((r_twin > 0.05) & (r_twin < cfg["copy_margin"])) > 10  # not only exact ones
    assert pooled["near_copies"]["near_copies"] == near > 0
    assert pooled["near_copies"]["holdout_flagged"] == flagged
    cut = cfg["thresholds"]["record_ratio"]
    record = pooled["close_to_one_record"]
    assert record["twin_share"] == pytest.approx(np.mean(r_twin < cut))
    assert record["holdout_share"] == pytest.approx(np.mean(np.concatenate(r_hold) < cut))
    assert pooled["sample_sizes"]["train"] == len(member)
    assert pooled["sample_sizes"]["holdout"] == len(nonmember)
    assert pooled["mia"]["gan_leaks_pixel"]["auc"] == pytest.approx(auc, abs=0.005)
    ratio = np.median(np.concatenate(d_twin)) / np.median(np.concatenate(d_hold))
    assert pooled["dcr"]["pixel"]["ratio"] == pytest.approx(ratio, rel=0.03)
    s_twin, s_hold = np.concatenate(s_twin), np.concatenate(s_hold)
    width = 2 / cfg["bins"]  # the SSIM bins
    for q in (0.5, 0.95, 0.99):
        assert pooled["ssim"]["twin_quantiles"][str(q)] == pytest.approx(
            np.quantile(s_twin, q), abs=width
        )
        assert pooled["ssim"]["holdout_quantiles"][str(q)] == pytest.approx(
            np.quantile(s_hold, q), abs=width
        )
    above = np.mean(s_twin > np.quantile(s_hold, 0.99))
    assert pooled["ssim"]["twin_above_holdout_q99"] == pytest.approx(above, abs=0.02)


@pytest.mark.parametrize("which", [min, max])
def test_real_images_the_generator_never_saw_are_not_copies(hospitals, cfg, which):
    """New patients are not copies: the other hospitals' images, audited as a twin at the
    smallest and at the largest hospital, give no near copy (exact duplicates of its
    images set aside) and no more close-to-one-record images than its own holdout."""
    h = which(hospitals, key=lambda x: len(x.train.images))
    mine = {img.tobytes() for img in h.train.images}
    others = np.concatenate([o.train.images for o in hospitals if o is not h])
    others = others[[img.tobytes() not in mine for img in others]]
    site = audit.site_audit(others, h.train.images, h.holdout.images, cfg)
    assert len(others) > 300 and site["copies"]["near_copies"] == 0, site["copies"]
    assert site["copies"]["holdout_flagged"] == 0
    result = audit_pool.pool({h.name: site}, cfg, 28)
    assert next(c for c in result["checks"] if "record" in c["check"])["passed"], result["checks"]


def test_a_blend_that_is_mostly_one_patient_fails_the_record_check(hospitals, cfg):
    """70 % of a training image and 30 % of its nearest neighbour: no near copy by the
    margin, but a twin with many of them sits close to single records far more often
    than the holdout does."""
    h = max(hospitals, key=lambda x: len(x.train.images))
    train = h.train.images.astype(float)
    flat = train.reshape(len(train), -1)
    d = cdist(flat, flat)
    np.fill_diagonal(d, np.inf)
    blends = 0.7 * train[:60] + 0.3 * train[d[:60].argmin(1)]
    twin = np.concatenate([noise_twin(hospitals, 300), blends.round().astype(np.uint8)])
    site = audit.site_audit(twin, h.train.images, h.holdout.images, cfg)
    result = audit_pool.pool({h.name: site}, cfg, 28)
    check = next(c for c in result["checks"] if "record" in c["check"])
    assert result["close_to_one_record"]["twin_share"] > 0.1 and not check["passed"], check
    assert result["verdict"] == "fail"


def test_noisy_and_blurred_copies_are_caught(hospitals, cfg):
    h = max(hospitals, key=lambda x: len(x.train.images))
    picked = h.train.images[:30].astype(float)
    noisy = picked + np.random.default_rng(0).normal(0, 5.0, picked.shape)  # 2 % of range
    blurred = sum(np.roll(picked, s, axis=a) for s in (-1, 1) for a in (1, 2)) + picked
    for copies, caught in ((noisy, 30), (blurred / 5, 20)):
        twin = np.clip(copies, 0, 255).round().astype(np.uint8)
        found = audit.site_audit(twin, h.train.images, h.holdout.images, cfg)["copies"]
        assert found["near_copies"] >= caught, found


def test_duplicates_in_real_data_are_not_blamed(hospitals, cfg):
    h = hospitals[0]
    train = np.concatenate([h.train.images, h.train.images[:5]])  # 5 duplicate trainings
    holdout = np.concatenate([h.holdout.images, h.train.images[5:9]])  # 4 members in disguise
    twin = noise_twin(hospitals, 200)
    before = audit.site_audit(twin, h.train.images, h.holdout.images, cfg)
    site = audit.site_audit(twin, train, holdout, cfg)
    assert site["train_duplicates_removed"] == before["train_duplicates_removed"] + 5
    assert site["holdout_in_train_removed"] == before["holdout_in_train_removed"] + 4
    assert site["n_holdout"] == before["n_holdout"]
    assert site["copies"]["near_copies"] == 0
    # ... but a copy of a duplicated training image is still a copy
    copied = np.concatenate([twin, h.train.images[:3]])
    assert audit.site_audit(copied, train, holdout, cfg)["copies"]["near_copies"] == 3


def test_too_small_holdout_is_a_clear_error(hospitals, cfg):
    h = hospitals[0]
    with pytest.raises(audit.AuditError, match="holdout_fraction"):
        audit.site_audit(h.train.images[:10], h.train.images, h.holdout.images[:2], cfg)


def test_auc_from_hists_matches_sklearn():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 50, 300), rng.integers(10, 60, 200)
    edges = np.arange(0, 61) - 0.5  # one bin per integer score
    auc = histograms.auc_from_hists(histograms.hist(pos, edges), histograms.hist(neg, edges))
    truth = np.r_[np.ones(300), np.zeros(200)]
    assert auc == pytest.approx(roc_auc_score(truth, np.r_[pos, neg]), abs=1e-12)
    lo, hi = histograms.auc_interval(auc, 300, 200)
    assert lo < auc < hi and hi - lo < 0.2


def test_pooled_utility_equals_centralized_even_for_a_confident_classifier(hospitals):
    from fedtwin.metrics import Classifier, classification_scores, predict_proba
    from fedtwin.utility import pool_utility, site_utility

    torch.manual_seed(0)
    clf = Classifier(2)
    with torch.no_grad():  # logits of +-20 and more: probabilities round to 0 and 1
        clf.head.weight.mul_(400.0)
    images = np.concatenate([h.holdout.images for h in hospitals])
    labels = np.concatenate([h.holdout.labels for h in hospitals])
    probs = predict_proba(clf, images)
    assert np.mean((probs[:, 1] < 1e-6) | (probs[:, 1] > 1 - 1e-6)) > 0.5
    direct = classification_scores(probs, labels)
    pooled = pool_utility({h.name: site_utility(clf, h.holdout.images, h.holdout.labels)
                           for h in hospitals})  # fmt: skip
    assert pooled["n"] == len(labels)
    assert pooled["acc"] == pytest.approx(direct["acc"])
    assert pooled["auc"] == pytest.approx(direct["auc"], abs=0.005)


def test_copy_ratios_search_spacings_only_where_needed_and_match_the_full_computation(hospitals):
    """Spacings computed only for the training images some candidate is nearest to give
    the same ratios as every spacing computed (brute force, scipy), floor included."""
    h = max(hospitals, key=lambda x: len(x.train.images))
    train, _, _ = audit.deduplicate(h.train.images, h.holdout.images)
    candidates = (noise_twin(hospitals, 50), h.holdout.images)
    (got_twin, got_hold), _ = audit.copy_ratios(train, candidates, 7)
    expected = []
    for images in candidates:
        per_space = []
        for space in (audit.pixels, lambda x: audit.coarse(x, 7)):
            t, c = space(train), space(images)
            d = cdist(t, t)
            np.fill_diagonal(d, np.inf)
            spacing = d.min(1)
            spacing = np.maximum(spacing, max(np.quantile(spacing, 0.05), 1e-12))
            to_train = cdist(c, t)
            per_space.append(to_train.min(1) / spacing[to_train.argmin(1)])
        expected.append(np.minimum(*per_space))
    np.testing.assert_allclose(got_twin, expected[0], rtol=1e-9)
    np.testing.assert_allclose(got_hold, expected[1], rtol=1e-9)


def test_a_large_archive_is_sampled_but_every_training_image_is_searched(hospitals, cfg):
    """Above audit.max_records the holdout and the scored members are samples of that
    size (counted in the reply), and a copy of any training image, sampled or not, is
    still found: the twin is searched against every training image."""
    h = max(hospitals, key=lambda x: len(x.train.images))
    cap = 40
    assert len(h.train.images) > 5 * cap and len(h.holdout.images) > cap
    small = {**cfg, "max_records": cap}
    twin = np.concatenate([noise_twin(hospitals, 100), h.train.images[-5:]])
    site = audit.site_audit(twin, h.train.images, h.holdout.images, small)
    assert site["copies"]["near_copies"] == 5
    assert site["n_holdout"] == cap
    assert site["n_train"] == len(h.train.images) - site["train_duplicates_removed"]
    assert site["members_sampled_out"] == site["n_train"] - cap
    assert site["holdout_sampled_out"] == (
        len(h.holdout.images)
        - cap
        - site["holdout_in_train_removed"]
        - site["holdout_duplicates_removed"]
    )
    members = site["mia"]["gan_leaks_pixel"]["members"]
    assert int(np.sum(members)) == cap  # the attacks scored the sample of members
    everyone = audit.site_audit(twin, h.train.images, h.holdout.images, cfg)
    assert everyone["members_sampled_out"] == everyone["holdout_sampled_out"] == 0
    assert int(np.sum(everyone["mia"]["gan_leaks_pixel"]["members"])) == everyone["n_train"]
