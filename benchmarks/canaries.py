"""(l) An audit that proves it can see: the demo's setting with canaries (``audit.canaries``,
``fedtwin.canaries``) at epsilon 1, epsilon 10 and with DP off (the positive control),
--runs runs each: canaries guessed and guessed right, the empirical epsilon lower bound
beside the accounted epsilon, and the issue's acceptance checks on them.

Acceptance (issue 34): the control finds at least 90 % of the canaries it guesses on and
proves a lower bound well above 1; with DP on, the lower bound stays at or below the
accounted epsilon in every run (a run where it does not is a privacy bug: its row says so).
"""

from __future__ import annotations

import math
from pathlib import Path

from benchmarks.common import SETTING, repeated

CANARIES = 100  # per hospital, unless the overrides name audit.canaries
SETTINGS = {
    "epsilon_1": ["privacy.epsilon=1"],
    "epsilon_10": ["privacy.epsilon=10"],
    "dp_off": ["privacy.enabled=false"],
}


def part_l(out_dir: Path, overrides: list[str], runs: int) -> dict:
    canaries = [] if any(o.startswith("audit.canaries=") for o in overrides) else [
        f"audit.canaries={CANARIES}"
    ]  # fmt: skip
    result = {}
    for name, extra in SETTINGS.items():
        setting = [*SETTING, *overrides, *canaries, *extra]
        runs_of = repeated(out_dir / f"l_{name}", setting, runs)
        result[name] = {"setting": setting, "runs": [canary_figures(r) for r in runs_of["runs"]]}
    result["acceptance"] = acceptance(result)
    return result


def canary_figures(run: dict) -> dict:
    """One demo run's canary audit (its manifest's ``audit.canaries``), with the verdict."""
    c = run["audit"]["canaries"]
    accounted = float(c["epsilon_accounted"])  # "inf" with DP off
    return {
        "canaries": c["canaries"],
        "guessed": c["guessed"],
        "correct": c["correct"],
        "share_right": c["correct"] / c["guessed"] if c["guessed"] else math.nan,
        "epsilon_lower_bound": c["epsilon_lower_bound"],
        "epsilon_lower_bound_max": c["epsilon_lower_bound_max"],
        "epsilon_accounted": accounted,
        "bound_above_accounted": c["epsilon_lower_bound"] > accounted,  # a privacy bug
        "audit_verdict": run["gate"]["audit_verdict"],
        "output": run["output"],
    }


def acceptance(result: dict) -> dict:
    """The issue's checks over every run of each setting."""
    control = result["dp_off"]["runs"]
    dp_runs = result["epsilon_1"]["runs"] + result["epsilon_10"]["runs"]
    return {
        "control_right_at_least_90_percent": all(r["share_right"] >= 0.9 for r in control),
        "control_bound_above_1": all(r["epsilon_lower_bound"] > 1 for r in control),
        "dp_bound_never_above_accounted": not any(r["bound_above_accounted"] for r in dp_runs),
    }


def summary_lines(part: dict) -> list[str]:
    lines = []
    for name in SETTINGS:
        for i, r in enumerate(part.get(name, {}).get("runs", [])):
            lines.append(
                f"l {name} run {i + 1}: {r['correct']} of {r['guessed']} canary guesses right "
                f"({r['canaries']} canaries): empirical epsilon >= "
                f"{r['epsilon_lower_bound']:.2f} (at most {r['epsilon_lower_bound_max']:.2f}) "
                f"vs accounted {r['epsilon_accounted']:.2f}"
            )
    if "acceptance" in part:
        lines.append(f"l acceptance: {part['acceptance']}")
    return lines
