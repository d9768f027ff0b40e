"""What a reader study releases, and how the consortium pools it.

A hospital releases counts only (``aggregate``): per class of the image shown and per
source (its own images, the twin's), how many readings, how many called the image real,
the realism scores' histogram (1-5) and how many readings named the image's class. No
image, no file name, no reader's name, no per-image row. Counts pool exactly (``pool``):
the consortium's figures are those of one study holding every hospital's readings.

The figures (``figures``): the readers' accuracy at telling real from synthetic, with a
Wilson 95 % interval (0.5, chance, is the goal: readers cannot tell), the mean realism of
real and of twin images, and label agreement (the share of readings that named the image's
class). The interval treats readings as independent; readings by one reader, or of one
image, are not, so it is narrower than it should be when few readers read few images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from fedtwin.histograms import wilson_interval
from fedtwin.review.store import Study

FORMAT = "fedtwin reader study aggregate"
SOURCES = ("real", "twin")
Z95 = 1.959963984540054
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _empty() -> dict:
    return {"readings": 0, "called_real": 0, "realism": [0] * 5, "label_agreed": 0}


def aggregate(study: Study, hospital: str) -> dict:
    """The counts the hospital sends (see the module's docstring)."""
    names = study.class_names
    per_class = {name: {s: _empty() for s in SOURCES} for name in names}
    for r in study.readings():
        cell = per_class[names[r["label"]]][r["source"]]
        cell["readings"] += 1
        cell["called_real"] += r["said_real"]
        cell["realism"][r["realism"] - 1] += 1
        cell["label_agreed"] += int(r["read_label"] == r["label"])
    counts = study.counts()
    return {
        "format": FORMAT,
        "hospital": hospital,
        "twin_images_sha256": study.meta("twin_images_sha256"),
        "class_names": names,
        "readers": counts["readers"],
        "images": {s: int(counts["images"].get(s, 0)) for s in SOURCES},
        "per_class": per_class,
    }


def _sum(cells: Sequence[Mapping]) -> dict:
    out = _empty()
    for c in cells:
        out["readings"] += c["readings"]
        out["called_real"] += c["called_real"]
        out["label_agreed"] += c["label_agreed"]
        out["realism"] = [a + b for a, b in zip(out["realism"], c["realism"], strict=True)]
    return out


def _mean_realism(hist: Sequence[int]) -> float:
    n = sum(hist)
    return sum((k + 1) * c for k, c in enumerate(hist)) / n if n else math.nan


def figures(real: Mapping, twin: Mapping) -> dict:
    """The reader figures of one cell (a class, or all classes) from its counts."""
    n = real["readings"] + twin["readings"]
    correct = real["called_real"] + (twin["readings"] - twin["called_real"])
    low, high = wilson_interval(correct, n, Z95)

    def share(k: int, m: int) -> float:
        return k / m if m else math.nan

    return {
        "readings": n,
        "real_vs_synthetic_accuracy": share(correct, n),
        "accuracy_ci95": [low, high],
        "realism_real": _mean_realism(real["realism"]),
        "realism_twin": _mean_realism(twin["realism"]),
        "twin_called_real": share(twin["called_real"], twin["readings"]),
        "label_agreement_real": share(real["label_agreed"], real["readings"]),
        "label_agreement_twin": share(twin["label_agreed"], twin["readings"]),
    }


def summarise(per_class: Mapping[str, Mapping[str, Mapping]]) -> dict:
    """Figures per class and over all classes from per-class counts."""
    out = {"per_class": {c: figures(v["real"], v["twin"]) for c, v in per_class.items()}}
    out["all"] = figures(
        _sum([v["real"] for v in per_class.values()]),
        _sum([v["twin"] for v in per_class.values()]),
    )
    return out


def check_aggregate(agg: object, where: str) -> dict:
    """A hospital's aggregate as the consortium receives it: the format and every count
    checked, so a damaged or foreign file is named, not half-pooled."""
    if not isinstance(agg, dict) or agg.get("format") != FORMAT:
        raise ValueError(f"{where}: not a reader study aggregate (`fedtwin review summary`)")
    hospital, images, sha = agg.get("hospital"), agg.get("images"), agg.get("twin_images_sha256")
    if not isinstance(hospital, str) or not hospital:
        raise ValueError(f"{where}: 'hospital' must name the hospital")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise ValueError(f"{where}: 'twin_images_sha256' must be 64 lowercase hex digits")
    if not _count(agg.get("readers")):
        raise ValueError(f"{where}: 'readers' must be a count")
    if not (
        isinstance(images, dict)
        and set(images) == set(SOURCES)
        and all(_count(v) for v in images.values())
    ):
        raise ValueError(f"{where}: 'images' must give the counts of real and twin images")
    names = agg.get("class_names")
    per_class = agg.get("per_class")
    if (
        not isinstance(names, list)
        or not all(isinstance(n, str) for n in names)
        or len(set(names)) != len(names)
        or not isinstance(per_class, dict)
        or set(per_class) != set(names)
    ):
        raise ValueError(f"{where}: class_names (distinct names) and per_class do not match")
    for name, cell in per_class.items():
        for source in SOURCES:
            c = cell.get(source) if isinstance(cell, dict) else None
            ok = (
                isinstance(c, dict)
                and all(_count(c.get(k)) for k in ("readings", "called_real", "label_agreed"))
                and isinstance(c.get("realism"), list)
                and len(c["realism"]) == 5
                and all(_count(v) for v in c["realism"])
                and sum(c["realism"]) == c["readings"]
                and c["called_real"] <= c["readings"]
                and c["label_agreed"] <= c["readings"]
            )
            if not ok:
                raise ValueError(f"{where}: per_class.{name}.{source}: counts are inconsistent")
    return agg


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def pool(aggregates: Sequence[Mapping]) -> dict:
    """The consortium's reader study: every hospital's counts summed, the figures of the
    sums, and each hospital's own figures (all hospitals must have read the same twin)."""
    if not aggregates:
        raise ValueError("no aggregates to pool")
    hospitals = [a["hospital"] for a in aggregates]
    if len(set(hospitals)) < len(hospitals):
        raise ValueError(f"a hospital sent more than one aggregate: {sorted(hospitals)}")
    twins = {a["twin_images_sha256"] for a in aggregates}
    if len(twins) > 1:
        raise ValueError("the aggregates come from studies of different twins")
    names = aggregates[0]["class_names"]
    if any(a["class_names"] != names for a in aggregates):
        raise ValueError("the aggregates name different classes")
    pooled = {
        c: {s: _sum([a["per_class"][c][s] for a in aggregates]) for s in SOURCES} for c in names
    }
    return {
        "twin_images_sha256": twins.pop(),
        "hospitals": len(aggregates),
        "readers": sum(a["readers"] for a in aggregates),
        "images": {s: sum(a["images"][s] for a in aggregates) for s in SOURCES},
        **summarise(pooled),
        "per_hospital": {a["hospital"]: summarise(a["per_class"]) for a in aggregates},
    }
