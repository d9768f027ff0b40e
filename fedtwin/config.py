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

ACCOUNTANTS = ("rdp", "prv")  # the Opacus accountants fedtwin plans and accounts with


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
    naming every setting that is wrong and what it must be."""
    problems = []

    def need(key: str, ok, expected: str) -> None:
        node: Any = cfg
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is _MISSING:
            problems.append(f"{key} is missing")
        elif not ok(node):
            problems.append(f"{key}={node!r}: {expected}")

    if cfg.get("privacy", {}).get("enabled", True):
        need("privacy.epsilon", _positive, "must be a positive number, e.g. 10")
        need("privacy.delta", lambda v: _number(v) and 0 < v < 1, "must lie in (0, 1), e.g. 1e-5")
        need("privacy.max_grad_norm", _positive, "must be a positive number, e.g. 20")
        need("privacy.label_noise", lambda v: _number(v) and v >= 0, "must be a number >= 0")
        need("privacy.feature_share", lambda v: _number(v) and 0 < v < 1, "must lie in (0, 1)")
    need("privacy.enabled", lambda v: isinstance(v, bool), "must be true or false")
    need("privacy.accountant", lambda v: v in ACCOUNTANTS, f"must be {' or '.join(ACCOUNTANTS)}")
    for key in ("hospitals", "rounds", "local_steps", "batch_size", "min_hospitals"):
        need(f"federation.{key}", _whole, "must be a whole number >= 1")
    need("federation.partition", lambda v: v in ("iid", "dirichlet"), "must be iid or dirichlet")
    need("federation.alpha", _positive, "must be a positive number, e.g. 0.5")
    need("federation.holdout_fraction", lambda v: _number(v) and 0 <= v < 1, "must lie in [0, 1)")
    need("federation.max_update_norm", _positive, "must be a positive number")
    need("twin.size", _whole, "must be a whole number >= 1")
    need("twin.checkpoints", _whole, "must be a whole number >= 1")
    need(
        "federation.warm_start_steps", lambda v: _whole(v) or v == 0, "must be a whole number >= 0"
    )
    need(
        "twin.label_mix",
        lambda v: v in ("federation", "balanced"),
        "must be federation or balanced",
    )
    need("data.image_size", _whole, "must be a whole number >= 1")
    need("device", lambda v: v in ("auto", "cpu", "cuda"), "must be auto, cpu or cuda")
    try:
        class_weights(cfg)
    except ValueError as e:
        problems.append(str(e))
    fed = cfg.get("federation", {})
    if _whole(fed.get("min_hospitals")) and _whole(fed.get("hospitals")):
        if fed["min_hospitals"] > fed["hospitals"]:
            problems.append(
                f"federation.min_hospitals={fed['min_hospitals']}: more than "
                f"federation.hospitals={fed['hospitals']}, so no round could ever start"
            )
    if problems:
        raise ValueError("config: " + "; ".join(problems))
    check_federation(cfg)


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


def _positive(value: Any) -> bool:
    return _number(value) and value > 0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


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


RUN_KEYS = ("out", "overrides", "config")  # the run config's own keys; the others are settings


def config_from_run(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """A Flower run's config: the run config's ``overrides`` (Hydra overrides as on the
    demo's command line, one string, e.g. ``"+experiment=tiny model=ddpm"``), then each of
    its dotted keys (``federation.rounds = 20`` in ``[tool.flwr.app.config]``, or
    ``flwr run --run-config "federation.rounds=2"``) applied to the shipped defaults. Or,
    given ``config`` (a JSON file of resolved settings, as ``fedtwin demo`` writes), that."""
    if run_config.get("config"):
        path = Path(str(run_config["config"]))
        extra = sorted(k for k, v in run_config.items() if k not in ("out", "config") and v != "")
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
