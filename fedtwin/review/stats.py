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
from typing import NoReturn

from fedtwin.histograms import wilson_interval
from fedtwin.review.names import MAX_CLASS_NAME, class_names_problem, is_name
from fedtwin.review.store import Study

FORMAT = "fedtwin reader study aggregate"
SOURCES = ("real", "twin")
Z95 = 1.959963984540054
_SHA256 = re.compile(r"[0-9a-f]{64}")
# readers, images, readings: far beyond any reader study, and every sum stays exact
MAX_COUNT = 10**9
MAX_NAME = MAX_CLASS_NAME  # a hospital's or a class's name, printed on one line
TWIN_HINT = "is --twin the twin the hospitals' readers read?"


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
    """A hospital's aggregate as the consortium receives it, checked so that nothing false is
    pooled (and signed into a twin's manifest); raises ValueError naming ``where`` and the field.

    Checked: the format; names of 1 to ``MAX_NAME`` printable characters, distinct class
    names; every count a whole number from 0 to ``MAX_COUNT``; in every cell,
    called real and label agreed at most its readings, which its realism histogram sums to;
    as many real as twin images (a study shows pairs), at least one of each; readings a study
    can give: every reader counted gave a reading, and no reader reads an image twice
    (``images_needed``).
    """
    if not isinstance(agg, dict) or agg.get("format") != FORMAT:
        raise ValueError(f"{where}: not a reader study aggregate (`fedtwin review summary`)")
    hospital, sha = agg.get("hospital"), agg.get("twin_images_sha256")
    if not _name(hospital):
        _refuse(where, f"'hospital' must name the hospital (1 to {MAX_NAME} printable characters)")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        _refuse(where, "'twin_images_sha256' must be 64 lowercase hex digits")
    if not _count(agg.get("readers")):
        _refuse(where, f"'readers' must be a count (a whole number 0 to {MAX_COUNT:,})")
    _check_images(agg.get("images"), where)
    _check_classes(agg.get("class_names"), agg.get("per_class"), where)
    for name, cell in agg["per_class"].items():
        for source in SOURCES:
            _check_cell(cell.get(source) if isinstance(cell, dict) else None, where, name, source)
    _check_readings(agg, where)
    return agg


def _refuse(
    where: str, problem: str, hint: str = "ask the hospital for its summary again"
) -> NoReturn:
    raise ValueError(f"{where}: {problem}; nothing pooled: {hint}")


def _name(v: object) -> bool:
    return is_name(v, MAX_NAME)


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT


def _check_images(images: object, where: str) -> None:
    if not (
        isinstance(images, dict)
        and set(images) == set(SOURCES)
        and all(_count(v) for v in images.values())
        and images["real"] == images["twin"] >= 1
    ):
        _refuse(where, "'images' must give as many real as twin images, at least 1 of each")


def _check_classes(names: object, per_class: object, where: str) -> None:
    if (
        class_names_problem(names) is not None
        or not isinstance(per_class, dict)
        or set(per_class) != set(names)
    ):
        _refuse(
            where,
            f"class_names must be distinct names (1 to {MAX_NAME} printable characters) and "
            "per_class must hold exactly those classes",
        )


def _check_cell(c: object, where: str, name: str, source: str) -> None:
    field = f"per_class.{name}.{source}"
    if not (
        isinstance(c, dict)
        and all(_count(c.get(k)) for k in ("readings", "called_real", "label_agreed"))
        and isinstance(c.get("realism"), list)
        and len(c["realism"]) == 5
        and all(_count(v) for v in c["realism"])
    ):
        _refuse(
            where,
            f"{field}: counts are inconsistent (readings, called_real, label_agreed and the 5 "
            f"realism counts must be whole numbers 0 to {MAX_COUNT:,})",
        )
    for key in ("called_real", "label_agreed"):
        if c[key] > c["readings"]:
            _refuse(
                where,
                f"{field}: counts are inconsistent ({key} {c[key]} > readings {c['readings']})",
            )
    if sum(c["realism"]) != c["readings"]:
        _refuse(
            where,
            f"{field}: counts are inconsistent (the realism histogram sums to "
            f"{sum(c['realism'])}, not to readings {c['readings']})",
        )


def _check_readings(agg: Mapping, where: str) -> None:
    readers, images = agg["readers"], agg["images"]["real"]
    total = sum(cell[s]["readings"] for cell in agg["per_class"].values() for s in SOURCES)
    if total < readers or (total and not readers):
        _refuse(
            where,
            f"'readers' is {readers} for {total} readings: every reader counted "
            "gave at least one reading",
        )
    need = sum(images_needed(agg))
    if need > images:
        _refuse(
            where,
            f"per_class: {total} readings by {readers} reader(s) need at least "
            f"{need} real and {need} twin images (no reader reads an image twice); "
            f"'images' gives {images}",
        )


def images_needed(agg: Mapping) -> list[int]:
    """Per class (``class_names``' order), the fewest images of each source its readings
    need: a reader reads an image once at most, and a class shows as many real as twin
    images, so ``ceil(readings / readers)`` of the more read source."""
    readers = agg["readers"]
    return [  # -(-a // b): the ceiling of a / b, exact for whole numbers of any size
        max(-(-agg["per_class"][name][s]["readings"] // readers) if readers else 0 for s in SOURCES)
        for name in agg["class_names"]
    ]


def check_fits_twin(
    agg: Mapping, class_names: list[str], class_counts: list[int], where: str
) -> None:
    """Refuse a checked aggregate whose study cannot have been made of this twin: other class
    names, more twin images than the twin holds, or in a class (``images_needed``)."""
    if agg["class_names"] != class_names:
        _refuse(
            where, f"class_names {agg['class_names']} are not the twin's {class_names}", TWIN_HINT
        )
    if agg["images"]["twin"] > sum(class_counts):
        _refuse(
            where,
            f"'images': {agg['images']['twin']} twin images; the twin has {sum(class_counts)}",
            TWIN_HINT,
        )
    for name, need, have in zip(class_names, images_needed(agg), class_counts, strict=True):
        if need > have:
            _refuse(
                where,
                f"per_class.{name}: the readings need at least {need} twin images "
                f"of {name!r}; the twin has {have}",
                TWIN_HINT,
            )


def pool(aggregates: Sequence[Mapping]) -> dict:
    """The consortium's reader study: every hospital's counts summed, the figures of the
    sums, and each hospital's own figures (all hospitals must have read the same twin)."""
    if not aggregates:
        raise ValueError("no aggregates to pool")
    hospitals = [a["hospital"] for a in aggregates]
    if len(set(hospitals)) < len(hospitals):
        raise ValueError(
            f"a hospital sent more than one aggregate: {sorted(hospitals)}; pool one each"
        )
    twins = {a["twin_images_sha256"] for a in aggregates}
    if len(twins) > 1:
        raise ValueError(
            "the aggregates come from studies of different twins (twin_images_sha256); "
            "pool each twin's apart"
        )
    names = aggregates[0]["class_names"]
    for a in aggregates:
        if a["class_names"] != names:
            raise ValueError(
                f"the aggregates name different classes: class_names {a['class_names']} "
                f"({a['hospital']}) and {names} ({aggregates[0]['hospital']})"
            )
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
