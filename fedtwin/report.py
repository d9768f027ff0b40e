"""``report.html``: one self-contained page on how good and how private a twin is.

Images are PNGs embedded as data URIs (matplotlib's object API, no global state); every
string that comes from config or data is escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedtwin.jsonio import dumps

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.3em .7em}
th{background:#f3f3f3}.warn{background:#fde8e8;border:2px solid #c00;padding:.8em}
.grids{display:flex;gap:2em;flex-wrap:wrap}.grids figure{margin:0}img{image-rendering:pixelated}
"""


def image_grid(images: np.ndarray, cols: int = 8) -> np.ndarray:
    """Tile uint8 ``(N, H, W)`` into one ``(rows*H, cols*W)`` image; missing tiles are 0."""
    n, h, w = images.shape
    rows = max(1, math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img
    return grid


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _grid_png(images: np.ndarray) -> str:
    grid = image_grid(images)
    fig = Figure(figsize=(grid.shape[1] / 40, grid.shape[0] / 40), dpi=80)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    return _png(fig)


def _loss_png(losses: Sequence[Mapping[str, float]]) -> str:
    fig = Figure(figsize=(6, 3), dpi=100)
    ax = fig.add_subplot()
    rounds = [r["round"] for r in losses]
    for key, label in (("loss_d", "discriminator"), ("loss_g", "generator")):
        ax.plot(rounds, [r.get(key, math.nan) for r in losses], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("mean local loss")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _num(value: Any, fmt: str = ".3f") -> str:
    try:
        return format(float(value), fmt)
    except (TypeError, ValueError):
        return "n/a"


def _get(d: Mapping, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, Mapping) or k not in d:
            return None
        d = d[k]
    return d


def _privacy_section(epsilons: Mapping[str, float], delta: float, dp_enabled: bool) -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{'∞' if math.isinf(eps) else _num(eps)}</td></tr>"
        for name, eps in epsilons.items()
    )
    warn = ""
    if not dp_enabled or any(math.isinf(v) for v in epsilons.values()):
        warn = (
            '<p class="warn"><b>DP off</b>: ε = ∞ — no privacy guarantee. '
            "This twin is a baseline and must not be shared.</p>"
        )
    return (
        f"<h2>Privacy</h2>{warn}<p>Sample-level (ε, δ)-DP per hospital, δ = {delta:g}, "
        "accounted by Opacus over every step each hospital took.</p>"
        f"<table><tr><th>hospital</th><th>ε spent</th></tr>{rows}</table>"
    )


def _utility_section(evaluation: Mapping) -> str:
    rows = ""
    for key, what in (("tstr", "trained on the twin"), ("trtr", "trained on real train")):
        r = evaluation.get(key, {}) if isinstance(evaluation, Mapping) else {}
        n = len(r.get("per_seed", [])) if isinstance(r, Mapping) else 0
        rows += (
            f"<tr><td>{key.upper()}</td><td>{what}</td>"
            f"<td>{_num(_get(r, 'auc_mean'))} ± {_num(_get(r, 'auc_std'))}</td>"
            f"<td>{_num(_get(r, 'acc_mean'))} ± {_num(_get(r, 'acc_std'))}</td><td>{n}</td></tr>"
        )
    fr = evaluation.get("frechet", {}) if isinstance(evaluation, Mapping) else {}
    space = html.escape(str(_get(fr, "feature_space") or "n/a"))
    return (
        "<h2>Utility</h2><p>A small CNN classifier scored on the real val split. TSTR: "
        "trained only on the twin; TRTR: trained on the hospitals' real training images.</p>"
        "<table><tr><th></th><th>classifier</th><th>AUC</th><th>accuracy</th><th>seeds</th>"
        f"</tr>{rows}</table><h2>Fidelity</h2><table>"
        f"<tr><td>Fréchet distance twin ↔ val</td><td>{_num(_get(fr, 'twin_vs_val'))}</td></tr>"
        f"<tr><td>twin ↔ train</td><td>{_num(_get(fr, 'twin_vs_train'))}</td></tr>"
        f"<tr><td>floor: real train ↔ val</td><td>{_num(_get(fr, 'train_vs_val_floor'))}</td>"
        f"</tr></table><p>Feature space: {space}. This is not Inception FID.</p>"
    )


def _grids_section(real_val, twin, class_names: Sequence[str], per_class: int = 32) -> str:
    out = "<h2>Images per class</h2>"
    for c, name in enumerate(class_names):
        real = real_val[0][real_val[1] == c][:per_class]
        fake = twin[0][twin[1] == c][:per_class]
        figs = ""
        for title, imgs in (("real (val)", real), ("twin", fake)):
            body = f'<img src="{_grid_png(imgs)}" alt="{title}">' if len(imgs) else "none"
            figs += f"<figure><figcaption>{title}</figcaption>{body}</figure>"
        out += f"<h3>{html.escape(str(name))}</h3><div class=grids>{figs}</div>"
    return out


def _losses_section(losses: Sequence[Mapping[str, float]]) -> str:
    if not losses:
        return "<h2>Training</h2><p>No rounds recorded.</p>"
    rows = "".join(
        f"<tr><td>{int(r['round'])}</td><td>{_num(r.get('loss_d'))}</td>"
        f"<td>{_num(r.get('loss_g'))}</td></tr>"
        for r in losses
    )
    return (
        f'<h2>Training</h2><img src="{_loss_png(losses)}" alt="losses per round">'
        "<table><tr><th>round</th><th>D loss</th><th>G loss</th></tr>" + rows + "</table>"
    )


def write_report(
    path: Path,
    *,
    real_val: tuple[np.ndarray, np.ndarray],
    twin: tuple[np.ndarray, np.ndarray],
    class_names: Sequence[str],
    epsilons: Mapping[str, float],
    delta: float,
    dp_enabled: bool,
    losses: Sequence[Mapping[str, float]],
    evaluation: Mapping[str, Any],
    config: Mapping[str, Any],
    wall_time_s: float,
    notes: Sequence[str] = (),
) -> Path:
    """Write the report atomically and return its path."""
    path = Path(path)
    minutes, seconds = divmod(int(round(wall_time_s)), 60)
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    body = "".join(
        [
            "<h1>fedtwin twin report</h1>",
            f"<p>{len(twin[0])} synthetic images; wall time {minutes} min {seconds} s.</p>",
            f"<ul>{notes_html}</ul>" if notes_html else "",
            _privacy_section(epsilons, delta, dp_enabled),
            _utility_section(evaluation),
            _grids_section(real_val, twin, class_names),
            _losses_section(losses),
            "<h2>Configuration</h2><details><summary>resolved config</summary><pre>",
            html.escape(dumps(config)),
            "</pre></details>",
        ]
    )
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>fedtwin twin report</title>'
        f"<style>{CSS}</style></head><body>{body}</body></html>"
    )
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
