"""Load the Hydra configuration shipped in ``fedtwin.conf``, apply overrides, and check it.

A mistyped override is one line naming it and the nearest settings that exist; a value no
run could use is refused by ``check_config`` before anything starts (no data loaded, no
Ray, no Flower).
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shlex
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import OmegaConf

from fedtwin import schema


def load_config(overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved run config as a plain dict, e.g. ``load_config(["+experiment=tiny"])``.

    Raises ValueError naming a mistyped override and the nearest valid settings.
    """
    overrides = list(overrides or [])
    try:
        return _compose(overrides)
    except HydraException as e:
        raise ValueError(_override_problem(overrides, e)) from None


def _compose(overrides: list[str]) -> dict[str, Any]:
    schema.register()
    with initialize_config_module(config_module="fedtwin.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _choices() -> dict[str, list[str]]:
    """Config group -> the options shipped for it (``model`` -> ``[dcgan, ddpm]``)."""
    root = resources.files("fedtwin.conf")
    return {
        group.name: sorted(
            f.name[: -len(".yaml")] for f in group.iterdir() if f.name.endswith(".yaml")
        )
        for group in root.iterdir()
        if group.is_dir() and not group.name.startswith("_")
    }


def _keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Every setting's dotted name, sections included (``privacy``, ``privacy.epsilon``)."""
    keys = []
    for key, value in tree.items():
        keys.append(prefix + str(key))
        if isinstance(value, Mapping):
            keys += _keys(value, f"{prefix}{key}.")
    return keys


def _override_problem(overrides: list[str], error: HydraException) -> str:
    """One line on the first override Hydra could not apply, with the nearest valid ones."""
    parser, choices = OverridesParser.create(), _choices()
    parsed = []
    for text in overrides:
        try:
            parsed.append((text, parser.parse_override(text)))
        except HydraException:
            return f"{text!r}: not a valid override; write key=value, e.g. federation.rounds=5"
    groups = [(t, o) for t, o in parsed if o.key_or_group in choices]
    for text, override in groups:
        options, value = choices[override.key_or_group], str(override.value())
        if not override.is_delete() and value not in options:
            return f"{text}: no such {override.key_or_group}; choose {_nearest(value, options)}"
    base = _compose([t for t, _ in groups])
    known = _keys(base) + [g for g in choices if g not in base]
    for text, override in parsed:
        key = override.key_or_group
        if key not in known and not (override.is_add() or override.is_force_add()):
            return f"{text}: no such setting; did you mean {_nearest(key, known)}?"
    cause = str(error.__cause__ or "")  # a value of the wrong type (fedtwin/schema.py)
    for text, override in parsed:
        if f"full_key: {override.key_or_group}\n" in cause + "\n":
            return f"config: {text}: {cause.splitlines()[0]}"
    return f"config: {str(error).splitlines()[0]}"


def _nearest(word: str, options: list[str]) -> str:
    """The options closest to ``word``, else those at its level (``privacy.*`` for
    ``privacy.x``), as "a, b or c"."""
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.6)
    if not close:
        section = word.rpartition(".")[0]
        close = [o for o in options if o.rpartition(".")[0] == section] or options
        close = ["one of " + ", ".join(sorted(close))]
    return " or ".join([", ".join(close[:-1]), close[-1]] if len(close) > 1 else close)


def check_federation(cfg: Mapping[str, Any]) -> None:
    """Refuse settings that could never finish a round, before anything starts."""
    fed = cfg["federation"]
    if fed.get("secure_aggregation") and int(fed["hospitals"]) < 2:
        raise ValueError(
            f"federation.secure_aggregation=true needs at least 2 hospitals (SecAgg+ masks "
            f"each update with keys shared with the others), but federation.hospitals="
            f"{fed['hospitals']}; set federation.secure_aggregation=false for one hospital"
        )


def check_config(cfg: Mapping[str, Any]) -> None:
    """Refuse a config no run could use, before anything starts: one ValueError, one line,
    naming every setting that is wrong and what it must be. Each number's range and each
    word's choices are in ``fedtwin.schema`` (``RANGES``, ``CHOICES``); the settings that
    must agree with one another are checked here."""
    problems = _value_problems(cfg) + _relation_problems(cfg)
    if problems:
        raise ValueError("config: " + "; ".join(problems))
    check_federation(cfg)


def _value_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Each setting on its own: its range, its choices, the class names, data.path."""
    problems = _problem(
        cfg, "privacy.enabled", lambda v: isinstance(v, bool), "must be true or false"
    )
    dp = _get(cfg, "privacy.enabled") is not False
    for key, allowed in schema.RANGES.items():
        if dp or not key.startswith("privacy."):  # without DP, epsilon & co. are not used
            problems += _problem(cfg, key, allowed.admits, allowed.describe())
    for key, options in schema.CHOICES.items():
        problems += _problem(cfg, key, lambda v, o=options: v in o, f"must be {_either(options)}")
    problems += _problem(
        cfg, "data.classes", _class_names,
        "must be a list of two or more different class names, e.g. [normal, pneumonia]",
    )  # fmt: skip
    problems += _problem(
        cfg, "data.path", lambda v: not v or not special_file(v),
        "is not a regular file or folder (a device, pipe or socket); give a MedMNIST .npz or "
        "a DICOM folder",
    )  # fmt: skip
    try:
        class_weights(cfg)
    except ValueError as e:
        problems.append(str(e))
    return problems


def _relation_problems(cfg: Mapping[str, Any]) -> list[str]:
    """Settings that are each in range but cannot go together (checked only where each is)."""
    problems = []
    if _valid(cfg, "federation.min_hospitals", "federation.hospitals"):
        least, hospitals = _get(cfg, "federation.min_hospitals"), _get(cfg, "federation.hospitals")
        if least > hospitals:
            problems.append(
                f"federation.min_hospitals={least}: more than federation.hospitals={hospitals}, "
                "so no round could ever start"
            )
    if _valid(cfg, "model.sample_steps", "model.timesteps"):
        steps, timesteps = _get(cfg, "model.sample_steps"), _get(cfg, "model.timesteps")
        if steps > timesteps:
            problems.append(
                f"model.sample_steps={steps}: more than model.timesteps={timesteps}; lower it"
            )
    if _valid(cfg, "model.features.features", "model.features.scales"):
        features, scales = _get(cfg, "model.features.features"), _get(cfg, "model.features.scales")
        if features < 2 * len(scales):
            problems.append(
                f"model.features.features={features}: too few for {len(scales)} scales; give "
                f"at least {2 * len(scales)}"
            )
    if _valid(cfg, "data.image_size"):
        problems += _image_size_problems(cfg, _get(cfg, "data.image_size"))
    return problems


def _image_size_problems(cfg: Mapping[str, Any], size: int) -> list[str]:
    """What must fit ``data.image_size``: the generator's halvings, the audit's coarse
    grid, the feature map's scales and patch."""
    from fedtwin.models import check_image_size

    problems = []
    try:
        check_image_size(str(_get(cfg, "model.name")), size)
    except ValueError as e:
        problems.append(str(e))
    for key in ("audit.copy_coarse", "model.features.patch"):
        if _valid(cfg, key) and _get(cfg, key) > size:
            problems.append(f"{key}={_get(cfg, key)}: larger than data.image_size={size}")
    if _valid(cfg, "model.features.scales"):
        for scale in _get(cfg, "model.features.scales"):
            if size % scale:
                problems.append(
                    f"model.features.scales: {scale} does not divide data.image_size={size}"
                )
    return problems


def _problem(cfg: Mapping[str, Any], key: str, ok, expected: str) -> list[str]:
    """``["key=value: expected"]`` when ``ok(value)`` is false, ``["key is missing"]`` when
    it is absent (a ``model.*`` key may be: each generator has its own), else ``[]``."""
    value = _get(cfg, key)
    if value is _MISSING:
        return [] if key.startswith("model.") else [f"{key} is missing"]
    return [] if ok(value) else [f"{key}={value!r}: {expected}"]


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    """The setting of dotted name ``key``, or ``_MISSING``."""
    node: Any = cfg
    for part in key.split("."):
        node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
    return node


def _valid(cfg: Mapping[str, Any], *keys: str) -> bool:
    """Whether every one of ``keys`` is present and in its range."""
    return all(schema.RANGES[k].admits(_get(cfg, k)) for k in keys)


def _either(options: tuple) -> str:
    words = [str(o) for o in options]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _class_names(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) >= 2
        and all(isinstance(c, str) and c.strip() for c in value)
        and len(set(value)) == len(value)
    )


def special_file(path: str | Path) -> bool:
    """Whether ``path`` exists but is neither a regular file nor a folder (``/dev/zero``, a
    pipe, a socket): nothing to read images from, and reading it may never end."""
    path = Path(path).expanduser()
    return path.exists() and not (path.is_file() or path.is_dir())


def class_weights(cfg: Mapping[str, Any]) -> list[float]:
    """``twin.class_weights`` ({class name: weight}, to over-sample rare classes) as one
    weight per class of ``data.classes``, 1 where a class is not named. A name that is not a
    class, or a weight that is not a positive number, is a ValueError naming it."""
    names = [str(c) for c in cfg.get("data", {}).get("classes", [])]
    given = dict(cfg.get("twin", {}).get("class_weights") or {})
    unknown = sorted(set(map(str, given)) - set(names))
    if unknown:
        raise ValueError(
            f"twin.class_weights={given}: {', '.join(map(repr, unknown))} is not a class of "
            f"this dataset (data.classes: {', '.join(names)})"
        )
    if not all(_number(w) and w > 0 for w in given.values()):
        raise ValueError(f"twin.class_weights={given}: every weight must be a positive number")
    return [float(given.get(c, 1.0)) for c in names]


_MISSING = object()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda, got {name!r}")
    return name


# The run config's own keys; the others are settings. ``progress``: where the run writes its
# progress events (fedtwin.progress), set by ``fedtwin demo`` only.
RUN_KEYS = ("out", "overrides", "config", "progress")


def config_from_run(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """A Flower run's config: the run config's ``overrides`` (Hydra overrides as on the
    demo's command line, one string, e.g. ``"+experiment=tiny model=ddpm"``), then each of
    its dotted keys (``federation.rounds = 20`` in ``[tool.flwr.app.config]``, or
    ``flwr run --run-config "federation.rounds=2"``) applied to the shipped defaults. Or,
    given ``config`` (a JSON file of resolved settings, as ``fedtwin demo`` writes), that."""
    if run_config.get("config"):
        path = Path(str(run_config["config"]))
        extra = sorted(
            k for k, v in run_config.items() if k not in ("out", "config", "progress") and v != ""
        )
        if extra:
            raise ValueError(f"run config: {', '.join(extra)} given with config={path}")
        cfg = json.loads(path.read_text())
        check_config(cfg)
        return cfg
    overrides = shlex.split(str(run_config.get("overrides", "")))
    overrides += [
        f"{key}={_override_value(value)}"
        for key, value in sorted(run_config.items())
        if key not in RUN_KEYS
    ]
    return load_config(overrides)


def _override_value(value: Any) -> str:
    """A run config value (bool, int, float or str) as Hydra reads it on a command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if re.fullmatch(r"[\w./+-]+", text):
        return text  # a plain word or path; "null" stays null
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
