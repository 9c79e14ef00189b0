"""Tables and pictures of an evaluation run: pure functions from arrays/dicts to Markdown or PNG bytes.

Nothing here reads or writes files; :mod:`pipeline.evaluate.evaluate` stores what these return.
Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state), so
they work on headless machines and in worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

import numpy as np
from matplotlib import colormaps
from matplotlib.patches import Rectangle

from pipeline import figures
from pipeline.method.metrics import specificity_gaps, specificity_means

# metrics.json names of the metrics (in table order), how they read in a table, and which way is better
METRICS: tuple[tuple[str, str, str], ...] = (
    ("mean_f1", "mean F1", "↑"),
    ("cont_f1", "cont. F1", "↑"),
    ("accuracy", "accuracy", "↑"),
    ("discrete_iou", "discr. IoU", "↑"),
    ("cont_iou", "cont. IoU", "↑"),
    ("auc", "AUC", "↑"),
    ("saliency", "saliency", "↓"),
    ("background_coverage", "bg. cov.", "↓"),
    ("object_coverage", "obj. cov.", "↑"),
    ("masks_per_second", "masks/s", "↑"),
)

# faithfulness to the classifier and localisation (pipeline.method.faithfulness), their own table
FAITHFULNESS: tuple[tuple[str, str, str], ...] = (
    ("deletion_auc", "deletion AUC", "↓"),
    ("insertion_auc", "insertion AUC", "↑"),
    ("pointing_game", "pointing game", "↑"),
    ("relevance_mass", "relevance mass", "↑"),
    ("average_drop", "avg. drop %", "↓"),
    ("average_increase", "avg. increase", "↑"),
    ("road_morf", "ROAD MoRF", "↓"),
    ("road_lerf", "ROAD LeRF", "↑"),
)

# how methods are called in titles and tables
METHOD_TITLES = {
    "explainer": "Explainer",
    "grad_cam": "Grad-CAM",
    "rise": "RISE",
    "extremal_perturbation": "Extremal Perturbations",
    "igos_pp": "iGOS++",
    "rt_saliency": "RT-Saliency",
    "zeros": "const. 0",
    "half": "const. 0.5",
    "ones": "const. 1",
    "ideal": "ideal",
}

# reference masks (constants, ground truth): shown in tables, never "best"
REFERENCE_METHODS = ("zeros", "half", "ones", "ideal")

# what each evaluate.protocol means, one line for the report (metrics.json["protocol"])
PROTOCOLS = {
    "project": (
        "project (void pixels ignored, ground truth resized by nearest neighbour, sigmoid probabilities; "
        "class specificity: soft masks of the classes an image holds)"
    ),
    "paper": (
        "paper (the paper's evaluation code, stevenstalder/NN-Explainer: void and bilinear-resized edges "
        "count as object, softmax probabilities, saliency summed over the image's classes; class "
        "specificity: masks of every class binarised at 0.1…0.9, mean over the images holding the row "
        "class; ideal = the ground truth itself)"
    ),
}


def _title(method: str, black_box: bool | None = None) -> str:
    if method == "explainer":
        return explainer_title(black_box)
    return METHOD_TITLES.get(method, method)


def explainer_title(black_box: bool | None) -> str:
    """How the Explainer row is called: "Explainer (white-box init)" when its checkpoint records
    ``black_box: false`` (its encoder started from the Explanandum's weights), else "Explainer"."""
    return "Explainer (white-box init)" if black_box is False else "Explainer"


def protocol_line(protocol: str | None) -> str:
    """The sentence that says which evaluation protocol a report shows ("" when not recorded)."""
    if not protocol:
        return ""
    return f"Protocol: {PROTOCOLS.get(protocol, protocol)}."


def _fmt(value: float | None, key: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if key == "masks_per_second":
        return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"
    return f"{value:.3f}"


def scored(methods: Mapping[str, Mapping]) -> dict[str, Mapping]:
    """The methods of metrics.json that ran (a method the classifier cannot have carries ``skipped``, a reason)."""
    return {m: v for m, v in methods.items() if "skipped" not in v}


def specificity_gap(matrix: Sequence[Sequence[float | None]] | np.ndarray) -> float:
    """Mean of the diagonal − mean of the off-diagonal cells of a class-specificity matrix (NaN/None
    cells, where no image held both classes, are left out); NaN when either part is empty.
    Large for class-specific masks: a class's mask keeps that class and hides the others."""
    m = np.array([[math.nan if v is None else float(v) for v in row] for row in matrix], dtype=np.float64)
    return math.nan if m.size == 0 else float(specificity_gaps(m))


def _gap_cell(spec: Mapping) -> str:
    """The gap, with its bootstrap interval when the evaluation recorded one: ``0.778 [0.71, 0.84]``."""
    text = _fmt(specificity_gap(spec["matrix"]))
    lo, hi = spec.get("gap_ci95") or (None, None)
    if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
        text += f" [{lo:.2f}, {hi:.2f}]"
    return text


def metrics_markdown(
    methods: Mapping[str, Mapping[str, float | None]],
    class_specificity: Mapping[str, Mapping] | None = None,
    num_images: int | None = None,
    title: str = "Evaluation",
    protocol: str | None = None,
    black_box: bool | None = None,
    paired: Mapping[str, Mapping[str, Mapping]] | None = None,
    paper_protocol: Mapping[str, Mapping] | None = None,
    search: Mapping[str, Mapping] | None = None,
) -> str:
    """A Markdown report: methods × metrics (arrows say which way is better), the specificity gap and the
    Explainer's paired differences to each baseline.

    Args:
        methods: ``{method: {metric: value}}`` as in metrics.json (None/NaN shown as "–").
        class_specificity: ``{method: {"classes", "matrix"}}`` for the methods with per-class masks.
        num_images: images the metrics average over.
        title: the heading.
        protocol: metrics.json's ``protocol`` (``project`` | ``paper``), said in a line under the heading.
        black_box: metrics.json's ``black_box``; False labels the Explainer row "Explainer (white-box init)".
        paired: metrics.json's ``paired`` (baseline → metric → ``delta``, ``ci95``).
        paper_protocol: metrics.json's ``paper_protocol`` (method → headline numbers under the paper's protocol).
        search: metrics.json's ``search`` (method → the candidates tried on the validation split, the chosen one).
    """
    class_specificity = class_specificity or {}
    paper = protocol == "paper"
    lines = [f"# {title}", ""]
    if protocol:
        lines += [protocol_line(protocol), ""]
    if num_images is not None:
        void = "void pixels and resized edges count as object" if paper else "void pixels ignored"
        lines += [
            (
                f"{num_images} test images; per image, the masks of its ground-truth classes merged by "
                f"pixel-wise max and compared with the ground-truth foreground ({void})."
            ),
            "",
        ]
    header, rows, _ = metrics_rows(methods, class_specificity, black_box=black_box)
    lines += _markdown_table(header, rows)
    lines += [
        "",
        (
            "mean F1: discrete F1 averaged over thresholds 0.25/0.5/0.75; discr. IoU: averaged over 0.1…0.9; "
            "saliency: log max(area, 0.05) − log p(classes | mask ⊙ x) (lower is better); bg./obj. cov.: mean "
            "mask over background / object pixels; masks/s: per-class masks produced per second "
            "(all classes of every image, scoring excluded)."
        ),
    ]
    ran_with = settings_line(methods, black_box)
    if ran_with:
        lines += ["", ran_with]
    skipped = {m: v["skipped"] for m, v in methods.items() if "skipped" in v}
    if skipped:
        lines += ["", *(f"{_title(m, black_box)} was not run: {why}." for m, why in skipped.items())]
    nan = {m: v.get("nan_masks") for m, v in methods.items() if v.get("nan_masks")}
    if nan:
        lines += [
            "",
            (
                "Masks holding NaN, scored as all-zero masks: "
                + ", ".join(f"{_title(m, black_box)} {n}" for m, n in nan.items())
                + "."
            ),
        ]
    if class_specificity:
        matrix = (
            "M[r][c] = mean softmax probability of class r on the image masked with the mask of class c "
            "binarised at 0.1…0.9 (mean over the thresholds), over the test images holding r"
            if paper
            else "M[r][c] = mean sigmoid probability of class r on the image masked with the mask of class c, "
            "over the test images holding both"
        )
        lines += [
            "",
            "## Class specificity",
            "",
            (
                f"{matrix}; spec. gap = mean diagonal − mean off-diagonal, in "
                "brackets its 95% bootstrap interval over the test images."
            ),
            "",
            "| method | mean diagonal | mean off-diagonal | gap [95% interval] |",
            "|---|---:|---:|---:|",
        ]
        for method, spec in class_specificity.items():
            m = np.array([[math.nan if v is None else v for v in row] for row in spec["matrix"]], dtype=float)
            d, o = (float(x) for x in specificity_means(m))
            lines.append(f"| {_title(method, black_box)} | {_fmt(d)} | {_fmt(o)} | {_gap_cell(spec)} |")
    if any("deletion_auc" in v for v in methods.values()):
        header, rows, _ = faithfulness_rows(methods, black_box)
        lines += ["", "## Faithfulness to the classifier and localisation", "", FAITHFULNESS_NOTE, ""]
        lines += _markdown_table(header, rows)
    if paired:
        lines += ["", f"## {_title('explainer', black_box)} − each baseline, paired", "", PAIRED_NOTE, ""]
        lines += _markdown_table(*paired_rows(paired, black_box))
    if search:
        lines += ["", "## Baseline settings chosen on the validation split", ""]
        for method, entry in search.items():
            lines += [f"{METHOD_TITLES.get(method, method)}, by {entry['metric']} on `{entry['split']}`:", ""]
            knobs = list(entry["chosen"])
            rows = []
            for c in entry["candidates"]:
                mark = " (chosen)" if c["settings"] == entry["chosen"] else ""
                rows.append([*(str(c["settings"][k]) for k in knobs), _fmt(c["value"]) + mark])
            lines += _markdown_table([*knobs, entry["metric"]], rows) + [""]
    if paper_protocol:
        lines += ["", "## Ours and the paper's protocol, the same images", "", PROTOCOL_NOTE, ""]
        lines += _markdown_table(*protocol_rows(methods, class_specificity, paper_protocol, black_box))
    return "\n".join(lines) + "\n"


def settings_line(methods: Mapping[str, Mapping], black_box: bool | None = None) -> str:
    """One sentence naming each baseline's settings (metrics.json ``settings``), the paper's where ours differ."""
    parts = []
    for method, values in methods.items():
        s = values.get("settings") or {}
        if method == "rise" and s:
            paper = f" (the paper's: {s['paper_masks']:,})" if s["masks"] != s["paper_masks"] else ""
            parts.append(f"RISE {s['masks']:,} masks{paper}, {s['grid']}×{s['grid']} cells, p {s['p']}")
        elif method == "grad_cam" and s:
            parts.append(f"Grad-CAM at layer `{s['layer']}`")
        elif method == "extremal_perturbation" and s:
            paper = f" (the paper's: {s['paper_steps']})" if s["steps"] != s["paper_steps"] else ""
            areas = ", ".join(f"{a:g}" for a in s["areas"])
            parts.append(f"Extremal Perturbations {s['steps']} steps{paper}, areas {areas}, {s['reward']} reward, "
                         f"smooth {s['smooth']:g}")  # fmt: skip
        elif method == "igos_pp" and s:
            paper = (
                f" (NN-Explainer's: {s['paper_iterations']} of {s['paper_ig_steps']})"
                if (s["iterations"], s["ig_steps"]) != (s["paper_iterations"], s["paper_ig_steps"])
                else ""
            )
            parts.append(f"iGOS++ {s['iterations']} iterations of {s['ig_steps']} integration steps{paper}, "
                         f"{s['score']} scores, blurred baseline")  # fmt: skip
        elif method == "rt_saliency" and s:
            parts.append(f"RT-Saliency: {s['loss']} loss")
    return ("Settings: " + "; ".join(parts) + ".") if parts else ""


PROTOCOL_NOTE = (
    "Each cell: ours → the paper's evaluation code (void and bilinear-resized object edges count as object, "
    "softmax saliency summed over the image's classes, class specificity from the masks of every class binarised "
    "at 0.1…0.9), on the same images and masks: how much the protocol alone moves each number."
)


def protocol_rows(
    methods: Mapping[str, Mapping],
    class_specificity: Mapping[str, Mapping] | None,
    paper_protocol: Mapping[str, Mapping],
    black_box: bool | None = None,
) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table: per method, each headline number under our protocol → under the paper's."""
    class_specificity = class_specificity or {}
    columns = (("cont_iou", "cont. IoU"), ("mean_f1", "mean F1"), ("saliency", "saliency"), ("gap", "spec. gap"))
    rows = []
    for method, paper in paper_protocol.items():
        ours = dict(methods.get(method, {}))
        if method in class_specificity:
            ours["gap"] = specificity_gap(class_specificity[method]["matrix"])
        cells = [f"{_fmt(ours.get(key), key)} → {_fmt(paper.get(key), key)}" for key, _ in columns]
        rows.append([_title(method, black_box)] + cells)
    return ["method"] + [label for _, label in columns], rows


#: the columns of the paired table: (metrics.json key, label, which way favours the Explainer)
PAIRED = (
    ("cont_iou", "Δ cont. IoU", "↑"),
    ("mean_f1", "Δ mean F1", "↑"),
    ("gap", "Δ spec. gap", "↑"),
    ("deletion_auc", "Δ deletion", "↓"),
    ("insertion_auc", "Δ insertion", "↑"),
    ("road_morf", "Δ ROAD MoRF", "↓"),
    ("road_lerf", "Δ ROAD LeRF", "↑"),
)
PAIRED_NOTE = (
    "Per image, the Explainer's value minus the baseline's on the same image (the gap: recomputed from the same "
    "resampled images for both), averaged; in brackets the 95% paired bootstrap interval over images (1,000 "
    "resamples, seeded). **Bold**: the interval excludes 0, in the direction that favours the Explainer; "
    "*italic*: it excludes 0 against it; plain: no difference the data can tell."
)


def paired_rows(
    paired: Mapping[str, Mapping[str, Mapping]], black_box: bool | None = None
) -> tuple[list[str], list[list[str]]]:
    """The paired table (:data:`PAIRED`) as text cells: ``(header, rows)``, one row per baseline."""
    header = ["baseline"] + [f"{label} {arrow}" for _, label, arrow in PAIRED]
    rows = []
    for baseline, deltas in paired.items():
        cells = []
        for key, _, arrow in PAIRED:
            entry = deltas.get(key)
            if not entry or entry.get("delta") is None or not math.isfinite(entry["delta"]):
                cells.append("–")
                continue
            lo, hi = entry.get("ci95") or (None, None)
            text = f"{entry['delta']:+.3f}"
            if lo is not None and hi is not None and math.isfinite(lo) and math.isfinite(hi):
                text += f" [{lo:+.3f}, {hi:+.3f}]"
                favours = lo > 0 if arrow == "↑" else hi < 0
                against = hi < 0 if arrow == "↑" else lo > 0
                text = f"**{text}**" if favours else f"*{text}*" if against else text
            cells.append(text)
        rows.append([_title(baseline, black_box)] + cells)
    return header, rows


def _marked_rows(
    methods: Mapping[str, Mapping[str, float | None]],
    columns: Sequence[tuple[str, str]],
) -> tuple[list[list[float | None]], list[list[bool]]]:
    """Values per method for ``columns`` (key, arrow), and which of them are the best among the methods
    that explain (constant and ideal masks are references)."""
    values = {m: [v.get(key) for key, _ in columns] for m, v in methods.items()}
    arrows = [arrow for _, arrow in columns]
    contenders = [m for m in methods if m not in REFERENCE_METHODS]
    best_of = []
    for j, arrow in enumerate(arrows):
        finite = [values[m][j] for m in contenders if values[m][j] is not None and math.isfinite(values[m][j])]
        best_of.append((max(finite) if arrow == "↑" else min(finite)) if finite else None)
    best = [
        [method in contenders and v is not None and v == b for v, b in zip(values[method], best_of)]
        for method in methods
    ]
    return [values[m] for m in methods], best


def metrics_rows(
    methods: Mapping[str, Mapping[str, float | None]],
    class_specificity: Mapping[str, Mapping] | None = None,
    black_box: bool | None = None,
) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """The metrics table as text cells: ``(header, rows, best)``; ``best[i][j]`` marks the best value
    of column j among the methods that explain (the constant and ideal masks are references). The
    Explainer row is called :func:`explainer_title` of ``black_box``."""
    class_specificity = class_specificity or {}
    methods = scored(methods)
    header = ["method"] + [f"{label} {arrow}" for _, label, arrow in METRICS] + ["spec. gap ↑"]
    columns = [(key, arrow) for key, _, arrow in METRICS] + [("gap", "↑")]
    with_gaps = {
        m: {**v, "gap": specificity_gap(class_specificity[m]["matrix"]) if m in class_specificity else None}
        for m, v in methods.items()
    }
    values, marks = _marked_rows(with_gaps, columns)
    keys = [key for key, _ in columns]
    rows = []
    for method, vals in zip(methods, values):
        cells = [_fmt(v, k) for v, k in zip(vals, keys)]
        if method in class_specificity:
            cells[-1] = _gap_cell(class_specificity[method])
        rows.append([_title(method, black_box)] + cells)
    return header, rows, [[False] + m for m in marks]


def faithfulness_rows(
    methods: Mapping[str, Mapping], black_box: bool | None = None
) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """The faithfulness table (:data:`FAITHFULNESS`) as text cells, like :func:`metrics_rows`; a value
    carries its 95% bootstrap interval (``faithfulness_ci95`` of the method) in brackets."""
    methods = scored(methods)
    header = ["method"] + [f"{label} {arrow}" for _, label, arrow in FAITHFULNESS]
    columns = [(key, arrow) for key, _, arrow in FAITHFULNESS]
    values, marks = _marked_rows(methods, columns)
    rows = []
    for method, vals in zip(methods, values):
        ci = methods[method].get("faithfulness_ci95") or {}
        cells = []
        for (key, _), v in zip(columns, vals):
            text = _fmt(v, key)
            lo, hi = ci.get(key) or (None, None)
            if text != "–" and lo is not None and hi is not None:
                text += f" [{_fmt(lo, key)}, {_fmt(hi, key)}]"
            cells.append(text)
        rows.append([_title(method, black_box)] + cells)
    return header, rows, [[False] + m for m in marks]


FAITHFULNESS_NOTE = (
    "Per (image, ground-truth class) pair with that class's map, averaged per image, then over images; "
    "in brackets the 95% bootstrap interval over images. Deletion / insertion (Petsiuk et al. 2018): pixels "
    "ranked by the map removed (replaced by 0 in normalised space, the mean colour) / revealed onto a "
    "Gaussian-blurred copy in equal steps; area under the class's sigmoid probability over the fraction. "
    "Pointing game (Zhang et al. 2018): the map's maximum within the tolerance of the class's pixels. "
    "Relevance mass (Arras et al. 2022): share of the map inside them. Avg. drop / increase (Chattopadhay "
    "et al. 2018): on m ⊙ x against x. ROAD (Rong et al. 2022): 10…90% of the pixels removed, most (MoRF) or "
    "least (LeRF) relevant first, and filled by noisy linear imputation from their neighbours; the mean "
    "probability over the fractions. Deletion, average drop / increase, saliency and class specificity "
    "replace the removed pixels by the mean colour, which is the operator the Explainer is trained with, so they "
    "favour it; insertion (from a blur), ROAD (imputed), pointing game and relevance mass do not use it."
)


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        *("| " + " | ".join(cells) + " |" for cells in rows),
    ]


def metrics_html(
    methods: Mapping[str, Mapping[str, float | None]],
    class_specificity: Mapping[str, Mapping] | None = None,
    protocol: str | None = None,
    black_box: bool | None = None,
) -> str:
    """The metrics table of :func:`metrics_markdown` as an HTML ``<table>``, best values in bold; its
    caption says the protocol (metrics.json's ``protocol``) when given, and ``black_box`` names the
    Explainer row as in :func:`metrics_markdown`."""
    caption = protocol_line(protocol) if protocol else ""
    return _html_table(*metrics_rows(methods, class_specificity, black_box=black_box), caption)


def faithfulness_html(methods: Mapping[str, Mapping], black_box: bool | None = None) -> str:
    """The faithfulness table of :func:`metrics_markdown` as an HTML ``<table>`` ("" when the evaluation
    computed none)."""
    if not any("deletion_auc" in v for v in methods.values()):
        return ""
    return _html_table(*faithfulness_rows(methods, black_box), FAITHFULNESS_NOTE)


def _html_table(header: list[str], rows: list[list[str]], best: list[list[bool]], caption: str = "") -> str:
    out = [
        "<table class='metrics'>"
        + (f"<caption>{escape(caption)}</caption>" if caption else "")
        + "<thead><tr>"
        + "".join(f"<th>{escape(h)}</th>" for h in header)
        + "</tr></thead><tbody>"
    ]
    for cells, marks in zip(rows, best):
        out.append(
            "<tr>"
            + "".join(f"<td><b>{escape(c)}</b></td>" if b else f"<td>{escape(c)}</td>" for c, b in zip(cells, marks))
            + "</tr>"
        )
    out.append("</tbody></table>")
    return "\n".join(out)


# ------------------------------------------------------------------------------------- figures


def f1_curve_png(curves: Mapping[str, Mapping[str, Sequence[float | None]]], title: str = "F1 vs threshold") -> bytes:
    """Discrete F1 of the merged masks against the binarisation threshold, one line per method.

    Args:
        curves: ``{method: {"thresholds": [...], "f1": [...]}}``.
    """
    fig = figures.new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    styles = {"zeros": ":", "half": ":", "ones": ":", "ideal": "--"}
    for method, curve in curves.items():
        t = np.asarray(curve["thresholds"], dtype=float)
        f1 = np.array([math.nan if v is None else v for v in curve["f1"]], dtype=float)
        ax.plot(
            t,
            f1,
            styles.get(method, "-"),
            marker="o" if method not in REFERENCE_METHODS else None,
            markersize=3,
            linewidth=2.2 if method == "explainer" else 1.4,
            label=_title(method),
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("threshold t (mask > t is object)")
    ax.set_ylabel("mean F1 over images")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, frameon=False)
    return figures.png(fig)


def faithfulness_curves_png(curves: Mapping[str, Mapping[str, Sequence[float | None]]]) -> bytes:
    """The mean deletion and insertion curves per method: the class's probability against the share of
    pixels removed (left) or revealed onto the blurred image (right), highest-ranked first.

    Args:
        curves: ``{method: {"deletion": [...], "insertion": [...]}}`` sampled at k/steps.
    """
    fig = figures.new_figure(10.0, 4.0)
    styles = {"zeros": ":", "half": ":", "ones": ":", "ideal": "--"}
    for col, (name, better) in enumerate((("deletion", "lower"), ("insertion", "higher"))):
        ax = fig.add_subplot(1, 2, col + 1)
        for method, curve in curves.items():
            y = np.array([math.nan if v is None else v for v in curve[name]], dtype=float)
            ax.plot(
                np.linspace(0, 1, len(y)),
                y,
                styles.get(method, "-"),
                linewidth=2.2 if method == "explainer" else 1.4,
                label=_title(method),
            )
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(f"share of pixels {'removed' if name == 'deletion' else 'revealed'}, highest-ranked first")
        ax.set_ylabel("class probability (sigmoid)")
        ax.set_title(f"{name} (area: {better} is better)")
        ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8, frameon=False)
    return figures.png(fig)


def class_specificity_png(
    matrix: Sequence[Sequence[float | None]] | np.ndarray, classes: Sequence[str], method: str = "explainer"
) -> bytes:
    """Annotated heatmap of the class-specificity matrix M[r][c] (rows: probability of class r; columns:
    the mask of class c), over the classes the split holds (:func:`held_classes`); the diagonal is outlined.
    Cells without an image holding both classes are grey and marked "–"."""
    full = np.array([[math.nan if v is None else float(v) for v in row] for row in matrix], dtype=float)
    held = held_classes(full)
    m = full[np.ix_(held, held)]
    classes = [classes[k] for k in held]
    C = len(classes)
    side = min(max(3.5, 0.45 * C + 2.0), 24.0)
    fig = figures.new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    shown = np.ma.masked_invalid(m)
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(shown, cmap=cmap, vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="sigmoid probability of row class")
    ax.set_xticks(range(C))
    ax.set_yticks(range(C))
    fontsize = 8 if C <= 20 else 6 if C <= 40 else 4
    ax.set_xticklabels(classes, rotation=60, ha="right", rotation_mode="anchor", fontsize=fontsize)
    ax.set_yticklabels(classes, fontsize=fontsize)
    ax.set_xlabel("mask of class c")
    ax.set_ylabel("probability of class r")
    if C <= 25:  # numbers stay readable
        for r in range(C):
            for c in range(C):
                v = m[r, c]
                text = "–" if not math.isfinite(v) else f"{v:.2f}"
                colour = "black" if (not math.isfinite(v) or v > 0.6) else "white"
                ax.text(c, r, text, ha="center", va="center", fontsize=max(fontsize - 1, 4), color=colour)
    for k in range(C):  # the diagonal: each class's own mask, what should stand out
        ax.add_patch(Rectangle((k - 0.5, k - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=1.5))
    gap = specificity_gap(m)
    hidden = len(full) - C
    ax.set_title(
        f"Class specificity — {_title(method)}"
        + (f" (gap {gap:.2f})" if math.isfinite(gap) else "")
        + (f"\n{C} classes the split holds ({hidden} it does not hold left out)" if hidden else "")
    )
    return figures.png(fig)


def held_classes(matrix: np.ndarray) -> list[int]:
    """The classes with a value in their row or column: those the split holds (a class no image holds has no
    cell at all). The matrix's own order."""
    finite = np.isfinite(np.asarray(matrix, dtype=float))
    return [k for k in range(finite.shape[0]) if finite[k].any() or finite[:, k].any()]


def overlays_png(rows: Sequence[Mapping], classes: Sequence[str], max_class_columns: int = 4) -> bytes:
    """:func:`pipeline.figures.overlays_png` with the methods' titles of the report."""
    return figures.overlays_png(rows, classes, max_class_columns, title=_title)
