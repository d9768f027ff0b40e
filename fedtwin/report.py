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
    """Tile uint8 ``(N, H, W)`` into one ``(rows*H, cols*W)`` image, or colour ``(N, H, W, C)``
    into ``(rows*H, cols*W, C)``; missing tiles are 0."""
    n, h, w = images.shape[:3]
    rows = max(1, math.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, *images.shape[3:]), dtype=np.uint8)
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
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, interpolation="nearest")  # RGB: as is
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
    subsets = [
        f"{key.upper()} on a random {r['train_images']:,} of its {r['of']:,} images"
        for key in ("tstr", "trtr")
        if isinstance(r := _get(evaluation, key), Mapping)
        and isinstance(r.get("train_images"), int)
        and isinstance(r.get("of"), int)
        and r["train_images"] < r["of"]
    ]
    subset = (
        f"<p>Trained on a subset (eval.max_train_images): {'; '.join(subsets)}.</p>"
        if subsets
        else ""
    )
    space = html.escape(str(_get(fr, "feature_space") or "n/a"))
    return (
        "<h2>Utility</h2><p>A small CNN classifier scored on the real val split. TSTR: "
        "trained only on the twin; TRTR: trained on the hospitals' real training images.</p>"
        "<table><tr><th></th><th>classifier</th><th>AUC</th><th>accuracy</th><th>seeds</th>"
        f"</tr>{rows}</table>{subset}<h2>Fidelity</h2><table>"
        f"<tr><td>Fréchet distance twin ↔ val</td><td>{_num(_get(fr, 'twin_vs_val'))}</td></tr>"
        f"<tr><td>twin ↔ train</td><td>{_num(_get(fr, 'twin_vs_train'))}</td></tr>"
        f"<tr><td>floor: real train ↔ val</td><td>{_num(_get(fr, 'train_vs_val_floor'))}</td>"
        f"</tr></table><p>Feature space: {space}. This is not Inception FID.</p>"
        + _manifold_table(evaluation.get("manifold") if isinstance(evaluation, Mapping) else None)
    )


MANIFOLD = ("precision", "recall", "density", "coverage")


def _manifold_table(manifold: Mapping | None) -> str:
    """Precision, recall, density and coverage against val, twin beside real train."""
    if not manifold:
        return ""
    rows = ""
    for who, label in (("twin", "twin"), ("real_ceiling", "real train (ceiling)")):
        scores = manifold.get(who, {})
        groups = [("all", scores), *sorted(scores.get("per_class", {}).items())]
        for group, values in groups:
            cells = "".join(f"<td>{_num(values.get(k))}</td>" for k in MANIFOLD)
            rows += f"<tr><td>{label}</td><td>{html.escape(str(group))}</td>{cells}</tr>"
    head = "".join(f"<th>{k}</th>" for k in MANIFOLD)
    return (
        f"<h3>Neighbourhoods in the class classifier's features, against val (k = "
        f"{manifold.get('k')}, {manifold.get('compared_size')} images each)</h3><p>Precision: "
        "share of twin images inside the real images' neighbourhoods; recall: share of real "
        "images inside the twin's; coverage: share of real images with a twin image among "
        "their nearest neighbours (low coverage = collapse); density about 1 when twin and "
        "real are alike. <b>What these cannot see</b>: the features are those of a classifier "
        "of the classes, which keeps what separates them and little else; a twin of smooth "
        "blobs with the right class cues scores high here. They measure diversity and class "
        "structure, not realism: that is the two-sample test above.</p>"
        f"<table><tr><th></th><th>class</th>{head}</tr>{rows}</table>"
    )


def _spectrum_png(log_power: Mapping[str, Sequence[float]]) -> str:
    fig = Figure(figsize=(5, 3), dpi=100)
    ax = fig.add_subplot()
    for name in ("val", "train", "twin"):
        if name in log_power:
            values = log_power[name]
            ax.plot(range(1, len(values) + 1), values, marker=".", label=name)
    ax.set_xlabel("spatial frequency (cycles per image)")
    ax.set_ylabel("log10 mean power")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _realism_section(
    realism: Mapping | None,
    quality: Mapping | None,
    twin,
    federated: Mapping | None = None,
    max_auc: float | None = None,
) -> str:
    """The quality gate's words, the two-sample test beside its floor, the same test at
    the hospitals (``federated``: ``fedtwin.realism.pool_two_sample``), the spectra, and
    the twin images the test finds most and least real."""
    e = html.escape
    warnings = (quality or {}).get("warnings", [])
    banner = "".join(f'<p class="warn"><b>{e(str(w))}</b></p>' for w in warnings)
    at_sites = _federated_two_sample(federated, max_auc)
    if not realism:
        return f"<h2>Realism</h2>{banner}<p>Not measured on val.</p>{at_sites}"
    ts, sp = realism["two_sample"], realism["spectrum"]
    rows = "".join(
        f"<tr><td>{label}</td><td>{_num(r['auc'])} [{_num(r['low'])}, {_num(r['high'])}]"
        f"</td></tr>"
        for label, r in (("twin vs real val", ts["twin_vs_real"]),
                         ("floor: real train vs real val", ts["real_vs_real_floor"]))
    )  # fmt: skip
    grids = "".join(
        f'<figure><figcaption>{title}</figcaption><img src="{_grid_png(twin[0][ts[key]])}" '
        f'alt="{title}"></figure>'
        for key, title in (("most_real", "most real"), ("least_real", "least real"))
        if ts.get(key)
    )
    return (
        f"<h2>Realism</h2>{banner}<p>A two-sample test: a CNN learns to tell "
        f"{ts['fit_per_side']} twin images from as many real training images "
        f"({ts['epochs']} epochs), then scores {ts['test_per_side']} real val images against "
        "as many twin images it has not seen. AUC 0.5: it cannot tell them apart; 1: it "
        "always can. The floor is the same test with real images in the twin's place.</p>"
        f"<table><tr><th>test</th><th>AUC [95 %, DeLong]</th></tr>{rows}</table>{at_sites}"
        "<p>Radial power spectrum: mean power per ring of spatial frequency (log10); fine "
        "detail (edges, ribs, texture) is the right-hand end. Mean absolute distance of the "
        f"log spectra, twin to val: {_num(sp['distance_twin_val'])}; real train to val "
        f"(floor): {_num(sp['distance_floor_train_val'])}; ratio "
        f"{_num(sp.get('distance_over_floor'), '.1f')}.</p>"
        f'<img src="{_spectrum_png(sp["log10_power"])}" alt="radial power spectra">'
        "<p>The twin images the two-sample classifier finds most and least real.</p>"
        f"<div class=grids>{grids}</div>"
    )


def _federated_two_sample(test: Mapping | None, max_auc: float | None) -> str:
    """The two-sample test run at each hospital on its own images: the pooled AUC, each
    hospital's AUC and counts, and the hospitals that could not run it."""
    if not test:
        return ""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(name)}</td><td>{_num(r.get('auc'))} [{_num(r.get('low'))}, "
        f"{_num(r.get('high'))}]</td><td>{r.get('n_real')} / {r.get('n_twin')}</td>"
        f"<td>{r.get('n_fit')}</td></tr>"
        for name, r in sorted(test.get("per_hospital", {}).items())
    )
    skipped = "".join(
        f"<li>{e(name)}: {e(str(why))}</li>"
        for name, why in sorted(test.get("skipped", {}).items())
    )
    auc = test.get("auc")
    pooled = (
        f"<tr><td>pooled</td><td>{_num(auc)} [{_num(test.get('low'))}, "
        f"{_num(test.get('high'))}]</td><td>{test.get('n_real')} / {test.get('n_twin')}</td>"
        "<td></td></tr>"
        if auc is not None
        else ""
    )
    warn = (
        f'<p class="warn"><b>At the hospitals the two-sample AUC is {_num(auc)}, above '
        f"eval.max_c2st_auc {_num(max_auc, 'g')}: a CNN tells the twin from their real "
        "images.</b></p>"
        if auc is not None and max_auc is not None and float(auc) > float(max_auc)
        else ""
    )
    return (
        f"<h3>At the hospitals</h3>{warn}<p>The same test run at each hospital on its own "
        "images: a CNN learns its training images against part of the twin, then scores its "
        "holdout against twin images it has not seen. Only histograms of the scores on "
        "shared bins, their counts and the hospital's AUC left it; the pooled AUC is that "
        "of every hospital's scores together (Hanley and McNeil's 95 % interval). Each "
        "hospital trains its own CNN, so the pooled figure also mixes their scales: the "
        "per-hospital AUCs say more about each.</p>"
        "<table><tr><th>hospital</th><th>AUC [95 %]</th><th>holdout / twin scored</th>"
        f"<th>fitted a side</th></tr>{rows}{pooled}</table>"
        f"{'<ul>' + skipped + '</ul>' if skipped else ''}"
    )


def _distance_png(dcr: Mapping[str, Any]) -> str:
    """Nearest-training-image distances of twin and holdout images, one panel per space."""
    spaces = [k for k in ("pixel", "feature") if k in dcr]
    fig = Figure(figsize=(5 * len(spaces), 3), dpi=100)
    for i, space in enumerate(spaces):
        ax = fig.add_subplot(1, len(spaces), i + 1)
        edges = np.asarray(dcr[space]["edges"], float)
        for key, label in (("twin_hist", "twin → train"), ("holdout_hist", "holdout → train")):
            counts = np.asarray(dcr[space][key], float)
            density = counts / max(counts.sum(), 1) / np.diff(edges)
            ax.stairs(density, edges, label=label)
        ax.set_xscale("symlog", linthresh=edges[1] if len(edges) > 1 else 1e-3)
        ax.set_xlabel(f"distance to nearest training image ({space} space)")
        ax.legend()
    fig.tight_layout()
    return _png(fig)


def _audit_section(
    audit: Mapping[str, Any] | None, gate: Mapping, utility: Mapping, class_names: Sequence[str]
) -> str:
    if not audit:
        return "<h2>Privacy audit</h2><p>No audit was run.</p>"
    e = html.escape
    verdict = str(audit.get("verdict"))
    if verdict == "pass":
        banner = "<p><b>Audit passed</b>: the twin was signed.</p>"
    elif gate.get("override"):
        banner = (
            '<p class="warn"><b>Audit FAILED</b> and the twin was signed by operator '
            f"override: {e(str(gate['override']))}</p>"
        )
    else:
        banner = '<p class="warn"><b>Audit FAILED</b>: the twin was not signed.</p>'
    checks = "".join(
        f"<tr><td>{e(str(c['check']))}</td><td>{_num(c['value'], '.4g')}</td>"
        f"<td>{e(str(c['rule']))}</td><td>{'pass' if c['passed'] else 'FAIL'}</td></tr>"
        for c in audit.get("checks", [])
    )
    mia = "".join(
        f"<tr><td>{e(name)}</td><td>{_num(r['auc'])} [{_num(r['ci95'][0])}, "
        f"{_num(r['ci95'][1])}]</td><td>{r['n_members']} / {r['n_nonmembers']}</td>"
        f"<td>{_num(r['control_auc'])}</td></tr>"
        for name, r in audit.get("mia", {}).items()
    )
    notes = "".join(f"<li>{e(str(n))}</li>" for n in audit.get("notes", []))
    sizes = audit.get("sample_sizes", {})
    copies = audit.get("near_copies", {})
    dcr = audit.get("dcr", {})
    sampled = ""
    if sizes.get("holdout_sampled_out") or sizes.get("members_sampled_out"):
        sampled = (
            f" The archives were larger than audit.max_records: {sizes['members_sampled_out']}"
            f" training images were left out of the membership scores and "
            f"{sizes['holdout_sampled_out']} holdout images out of the audit, at random; "
            "every training image was still searched for copies."
        )
    plot = f'<img src="{_distance_png(dcr)}" alt="distance histograms">' if dcr else ""
    return (
        f"<h2>Privacy audit</h2>{banner}<p>Run at each hospital on its own images: "
        f"{sizes.get('train')} training images (members) and {sizes.get('holdout')} holdout "
        f"images (non-members) in all; {sizes.get('train_duplicates_removed')} duplicate "
        f"training images and {sizes.get('holdout_in_train_removed')} holdout images "
        f"identical to a training image were set aside.{sampled} Only counts and histograms "
        "left the hospitals.</p>"
        "<table><tr><th>check</th><th>value</th><th>rule</th><th></th></tr>"
        f"{checks}</table><h3>Membership inference</h3>"
        "<table><tr><th>attack</th><th>AUC [95 %]</th><th>members / non-members</th>"
        f"<th>negative control AUC</th></tr>{mia}</table>"
        "<p>Near copies (twin images much closer to one training image than any other "
        f"real image at its hospital is): {copies.get('near_copies')}; holdout images "
        f"flagged by the same rule (false-positive baseline): "
        f"{copies.get('holdout_flagged')}.</p>{_ssim_line(audit.get('ssim'))}{plot}"
        f"{_canary_line(audit.get('canaries'))}"
        f"{'<ul>' + notes + '</ul>' if notes else ''}"
        "<h3>Federated utility</h3><p>The twin-trained classifier scored on every hospital's "
        f"holdout: AUC {_num(utility.get('auc'))}, accuracy {_num(utility.get('acc'))} "
        f"over {utility.get('n')} images.</p>{_per_hospital_table(utility, class_names)}"
    )


def _canary_line(canaries: Mapping[str, Any] | None) -> str:
    if not canaries:
        return ""
    return (
        f"<h3>Canaries</h3><p>{canaries['correct']} of {canaries['guessed']} guesses right on "
        f"{canaries['canaries']} synthetic canaries, each trained on with probability 1/2: "
        f"empirical ε ≥ {_num(canaries['epsilon_lower_bound'], '.2f')} (95 %; "
        f"{_num(canaries['epsilon_lower_bound_max'], '.2f')} if every guess were right) against "
        f"the accounted ε {_num(canaries['epsilon_accounted'], '.2f')}. A lower bound from an "
        "attack, never a guarantee: the guarantee is the accounted ε.</p>"
    )


def _ssim_line(similarity: Mapping[str, Any] | None) -> str:
    if not similarity:
        return ""
    t, h = similarity["twin_quantiles"], similarity["holdout_quantiles"]
    return (
        "<p>Structural similarity (SSIM, 1 = identical) of each twin image to its nearest "
        f"training image: median {_num(t['0.5'])}, 99th percentile {_num(t['0.99'])}; of "
        f"each holdout image to its nearest training image: {_num(h['0.5'])} and "
        f"{_num(h['0.99'])}. Twin images more similar than the holdout's 99th percentile: "
        f"{_num(100 * similarity['twin_above_holdout_q99'], '.1f')} % (1 % for a twin as "
        "far from the training images as unseen real images are).</p>"
    )


def _per_hospital_table(utility: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """Each hospital's holdout (its size, images per class) scored by the twin's classifier,
    and (eval.hybrid) by the hospital's own two: the same architecture trained on its own
    images alone, and the twin's classifier fine-tuned on them mixed with twin images: AUC /
    accuracy, and each class's accuracy (its recall)."""
    kinds = [("twin", utility)] + [(k, utility[k]) for k in ("hybrid", "real_only") if k in utility]
    heads = {"twin": "twin only", "hybrid": "own + twin", "real_only": "own images only"}

    def cell(figures: Mapping[str, Any] | None) -> str:
        figures = figures or {}
        per_class = figures.get("per_class", {})
        recalls = " / ".join(_num(per_class[c]["acc"]) for c in sorted(per_class, key=int))
        return (
            f"<td>{_num(figures.get('auc'))} / {_num(figures.get('acc'))}"
            f"{f'<br><small>{recalls}</small>' if recalls else ''}</td>"
        )

    def mix(figures: Mapping[str, Any] | None) -> str:
        per_class = (figures or {}).get("per_class", {})
        counts = " / ".join(str(per_class[c]["n"]) for c in sorted(per_class, key=int))
        return f"<td>{(figures or {}).get('n')}{f' ({counts})' if counts else ''}</td>"

    rows = []
    for name in sorted(utility.get("per_hospital", {})):
        cells = "".join(cell(_get(u, "per_hospital", name)) for _, u in kinds)
        own = _get(utility, "per_hospital", name)
        rows.append(f"<tr><td>{html.escape(name)}</td>{mix(own)}{cells}</tr>")
    if not rows:
        return ""
    pooled = "".join(cell(u) for _, u in kinds)
    head = "".join(f"<th>{heads[k]}: AUC / acc</th>" for k, _ in kinds)
    order = " / ".join(html.escape(str(c)) for c in class_names)
    return (
        "<p>Per hospital, on its own holdout: does the twin help it? A hospital the twin "
        "serves badly shows here, not in the pooled figure. In brackets and small print, per "
        f"class ({order}): the holdout's images, and the share of them classified right.</p>"
        f"<table><tr><th>hospital</th><th>holdout images</th>{head}</tr>{''.join(rows)}"
        f"<tr><td><b>all</b></td>{mix(utility)}{pooled}</tr></table>"
    )


def _label_mix_line(config: Mapping[str, Any], labels: np.ndarray, names: Sequence[str]) -> str:
    """How the twin's labels were drawn (``twin.label_mix``, ``twin.class_weights``) and the
    images per class that came out."""
    twin_cfg = config.get("twin", {})
    mode = twin_cfg.get("label_mix")
    how = {"federation": "the hospitals' label shares", "balanced": "equal shares"}.get(mode, mode)
    weights = {str(c): w for c, w in (twin_cfg.get("class_weights") or {}).items() if w != 1}
    over = "; ".join(f"{html.escape(c)} ×{_num(w, 'g')}" for c, w in weights.items())
    counts = np.bincount(np.asarray(labels, int), minlength=len(names))
    per_class = ", ".join(f"{html.escape(str(n))} {k}" for n, k in zip(names, counts, strict=True))
    if over:
        over = f", <b>over-sampled</b>: {over} (their share of the twin, not of the real data)"
    return f"<p>Labels: {html.escape(str(how))}{over}. Images per class: {per_class}.</p>"


def _grids_section(
    real_val, twin, class_names: Sequence[str], manifold: Mapping | None, per_class: int = 64
) -> str:
    """Per class, 64 real val images beside 64 twin images, with the class's coverage: a
    collapsed class shows as the same few images repeated."""
    out = (
        "<h2>Images per class</h2><p>The first 64 images of each class, real beside twin. "
        "A twin class made of a few images repeated has collapsed.</p>"
    )
    per = (manifold or {}).get("twin", {}).get("per_class", {})
    for c, name in enumerate(class_names):
        real = real_val[0][real_val[1] == c][:per_class]
        fake = twin[0][twin[1] == c][:per_class]
        figs = ""
        for title, imgs in (("real (val)", real), ("twin", fake)):
            body = f'<img src="{_grid_png(imgs)}" alt="{title}">' if len(imgs) else "none"
            figs += f"<figure><figcaption>{title}</figcaption>{body}</figure>"
        scores = per.get(str(c))
        figures = (
            f" — twin coverage {_num(scores['coverage'])}, precision {_num(scores['precision'])}"
            if scores
            else ""
        )
        out += f"<h3>{html.escape(str(name))}{figures}</h3><div class=grids>{figs}</div>"
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


def _phases_section(phases: Mapping[str, float], wall_time_s: float) -> str:
    """Where the wall time went, phase by phase (the report's own writing is not in it)."""
    if not phases:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{seconds:.0f}</td>"
        f"<td>{100 * seconds / max(wall_time_s, 1e-9):.0f}%</td></tr>"
        for name, seconds in phases.items()
    )
    return (
        "<h2>Time</h2><table><tr><th>phase</th><th>seconds</th><th>of the wall time</th></tr>"
        + rows
        + "</table>"
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
    audit: Mapping[str, Any] | None = None,
    gate: Mapping[str, Any] | None = None,
    federated_utility: Mapping[str, Any] | None = None,
    quality: Mapping[str, Any] | None = None,
    phases: Mapping[str, float] | None = None,
) -> Path:
    """Write the report atomically and return its path. ``phases``: the seconds of each
    phase of the run, in order."""
    path = Path(path)
    minutes, seconds = divmod(int(round(wall_time_s)), 60)
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    body = "".join(
        [
            "<h1>fedtwin twin report</h1>",
            f"<p>{len(twin[0])} synthetic images; wall time {minutes} min {seconds} s.</p>",
            _label_mix_line(config, twin[1], class_names),
            f"<ul>{notes_html}</ul>" if notes_html else "",
            _privacy_section(epsilons, delta, dp_enabled),
            _audit_section(audit, gate or {}, federated_utility or {}, class_names),
            _realism_section(
                evaluation.get("realism"),
                quality,
                twin,
                (federated_utility or {}).get("two_sample"),
                _get(config, "eval", "max_c2st_auc"),
            ),
            _utility_section(evaluation),
            _grids_section(real_val, twin, class_names, evaluation.get("manifold")),
            _losses_section(losses),
            _phases_section(phases or {}, wall_time_s),
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
