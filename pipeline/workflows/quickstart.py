"""The main job in one command: data → classifier → Explainer → evaluation → registry → attribution → report.

Everything runs on the embedded defaults under one work dir (shards and checkpoints in local folders,
MLflow in an sqlite file there, a local Ray), or against ``wysiwyc stack`` (``with_stack``: shards,
checkpoints and outputs in its S3 bucket, tracking and registry on its MLflow server). The stages use
the CPU presets ``configs/cpu/*.yaml`` with the work dir's locations as overrides, so what the
quickstart shows is what those presets do.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline import pages, storage
from pipeline.attribute import attribute
from pipeline.config import EvaluateConfig, IngestConfig, load_config
from pipeline.data.ingest import ingest
from pipeline.data.synthetic import SyntheticReader
from pipeline.errors import WysiwycError
from pipeline.evaluate import report
from pipeline.evaluate.evaluate import evaluate
from pipeline.registry import register_checkpoint, register_classifier, resolve_model
from pipeline.stack import running_stack
from pipeline.tracking import embedded_uri
from pipeline.train.launch import train_classifier, train_explainer
from pipeline.workflows.promotion import promote, rollback

MODEL_NAME = "quickstart-explainer"
CLASSIFIER_NAME = "quickstart-classifier"  # registered too: the Explainer records the version it explains
SHARD_SIZE = 100
SPLITS = (("train", 0), ("val", 1), ("test", 2))  # (split, seed); sizes: train num_images, val/test 100
EVAL_IMAGES = 100
CORPUS = ("corpus", 3)  # the held-apart images that the attribution stage explains (num_corpus of them)
STAGES = ("data", "classifier", "explainer", "evaluate", "register", "promote", "attribute", "report")
# every default method but the per-image optimisations: Extremal Perturbations (50 steps × 4 areas per class)
# alone takes ~2½ minutes for the 100 test images on 2 cores, iGOS++ longer; `wysiwyc evaluate -c cpu/evaluate`
# runs both
QUICKSTART_SKIPS = ("extremal_perturbation", "igos_pp")


@dataclass
class Place:
    """Where the quickstart writes: a root for data/checkpoints/outputs and the tracking URI."""

    root: str  # local dir or s3://bucket/prefix
    tracking_uri: str
    local: Path  # always a local folder: report.html and the MLflow sqlite file live here

    def url(self, *parts: str) -> str:
        return storage.join(self.root, *parts)


def _place(workdir: str, with_stack: bool) -> Place:
    local = Path(workdir).resolve()
    local.mkdir(parents=True, exist_ok=True)
    if not with_stack:
        return Place(root=str(local), tracking_uri=embedded_uri(local), local=local)

    stack = running_stack()  # raises with "run `wysiwyc stack up` first" when it is not up
    # endpoint and credentials in the environment before Ray starts, so its workers sign S3 requests too
    os.environ.update(stack.env)
    return Place(root=f"s3://{stack.bucket}/quickstart", tracking_uri=stack.tracking_uri, local=local)


def _config(place: Place, preset: str, *overrides: str, user: list[str] = ()):
    """A CPU preset with the work dir's locations, the stage's own settings, then the user's overrides."""

    data = place.url("data", "synthetic")
    common = [
        f"data.train={data}/train",
        f"data.val={data}/val",
        f"data.test={data}/test",
        f"trainer.storage={place.url('checkpoints')}",
        f"tracking.uri={place.tracking_uri}",
        "tracking.experiment=quickstart",
    ]
    return load_config(f"cpu/{preset}", common + list(overrides) + list(user))


def train_shard_size(num_images: int, readers: int) -> int:
    """Samples per training shard: 100, or fewer so that each of ``readers`` (ranks × loader workers) gets a
    shard of its own."""
    return max(1, min(SHARD_SIZE, num_images // max(1, readers)))


def _make_data(place: Place, image_size: int, num_images: int, num_corpus: int, readers: int, opts) -> dict:
    """Synthetic train/val/test shards with exact masks, and a held-apart corpus of PNG files."""

    counts = {}
    # shards of 100 (train: fewer per shard when the readers would otherwise share one); val and test one each
    for split, seed in SPLITS:
        count = num_images if split == "train" else EVAL_IMAGES
        size = train_shard_size(count, readers) if split == "train" else SHARD_SIZE
        result = ingest(
            SyntheticReader(count, seed, split, image_size=image_size),
            place.url("data", "synthetic"),
            split,
            IngestConfig(shard_size=size, overwrite=True),
            opts,
        )
        counts[split] = result["num_samples"]
    name, seed = CORPUS
    reader = SyntheticReader(num_corpus, seed, name, image_size=image_size)
    for item in reader.items():
        sample = reader.load(item)
        storage.write_bytes(place.url(name, f"{sample.key}.{sample.ext}"), sample.image, opts)
    counts[name] = num_corpus
    return counts


def write_report(
    path: Path,
    *,
    metrics: dict,
    evaluation_dir: str,
    loss: dict,
    timings: dict,
    links: dict,
    opts=None,
    title: str = "wysiwyc quickstart",
    explainer: dict | None = None,
) -> None:
    """One self-contained ``report.html``: the metrics table, the F1-vs-threshold plot, the
    class-specificity matrices, the overlay grid (images embedded), the λ values, the Explainer's
    net and schedule (``explainer``: config key → value), stage timings and links to the outputs."""

    def figure(name: str, alt: str, width: str = "100%") -> str:
        try:
            return pages.png_img(storage.read_bytes(storage.join(evaluation_dir, name), opts), alt, width)
        except storage.NotFound:
            return f"<p>(no {html.escape(name)})</p>"

    spec = metrics.get("class_specificity", {})
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p><b>{html.escape(_kind_of_explainer(metrics))}</b></p>",
        (
            f"<p>{metrics.get('num_images')} held-apart test images with exact masks. Per image, the masks of its "
            "ground-truth classes merged by pixel-wise max, compared with the ground-truth foreground. "
            "Best explaining method per column in bold (constant and ideal masks are references).</p>"
        ),
        report.metrics_html(
            metrics["methods"], spec, protocol=metrics.get("protocol"), black_box=metrics.get("black_box")
        ),
        "<h2>Masks: Explainer (one forward pass, all classes) vs Grad-CAM vs RISE</h2>",
        figure("overlays.png", "overlay grid"),
        "<h2>F1 against the mask threshold</h2>",
        figure("f1_vs_threshold.png", "F1 vs threshold", "700px"),
        *(
            [
                f"<h2>Faithfulness to the classifier ({metrics['faithfulness']['images']} images)</h2>",
                report.faithfulness_html(metrics["methods"], metrics.get("black_box")),
                figure("faithfulness_curves.png", "deletion and insertion curves", "1000px"),
            ]
            if (metrics.get("faithfulness") or {}).get("images")
            else []
        ),
        (
            "<h2>Class specificity</h2><p>Cell (r, c): the classifier's probability of class r on the image "
            "masked with the mask of class c. Class-specific masks keep their class (diagonal) and hide the "
            "others (off-diagonal); the ideal (ground-truth) masks show how class-specific the classifier itself "
            "is, the reference for the others (soft masks can score above it).</p><div class='row'>"
        ),
        *(f"<div>{figure(f'class_specificity_{m}.png', m)}</div>" for m in spec),
        "</div><h2>Loss weights (λ, the paper's names)</h2><table>",
        *(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in loss.items()),
        "</table><h2>Explainer net and schedule</h2><table>",
        *(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in (explainer or {}).items()),
        "</table><h2>Stage timings</h2><table><tr><th>stage</th><th>seconds</th></tr>",
        *(f"<tr><td>{html.escape(k)}</td><td>{v:.1f}</td></tr>" for k, v in timings.items()),
        f"<tr><td><b>total</b></td><td><b>{sum(timings.values()):.1f}</b></td></tr></table>",
        "<h2>Outputs</h2><ul>",
        *(f"<li>{html.escape(k)}: {_link(v)}</li>" for k, v in links.items()),
        "</ul>",
    ]
    style = (
        "td,th{text-align:right}td:first-child,th:first-child{text-align:left}"
        ".row{display:flex;gap:1em;flex-wrap:wrap}.row>div{flex:1;min-width:300px}"
    )
    path.write_text(pages.page(title, "\n".join(parts), style), encoding="utf-8")


def _net_and_schedule(config) -> dict:
    """The Explainer settings a reader of the report needs beside the λ values."""
    e, t = config.explainer, config.trainer
    return {
        "explainer.init": e.init,
        "black box (the classifier only called)": e.black_box,
        **({"explainer.distill_epochs": e.distill_epochs} if e.init == "distilled" else {}),
        "explainer.arch": e.arch,
        **({"explainer.levels": e.levels} if e.arch == "compact" else {}),
        "explainer.cam": e.cam,
        "trainer.epochs": t.epochs,
        "trainer.batch_size (per worker)": t.batch_size,
        "trainer.num_workers": t.num_workers,
        "optim.lr": config.optim.lr,
    }


def _kind_of_explainer(metrics: dict) -> str:
    """The report's lead: whether the Explainer is the paper's black-box method, and how it started."""
    init = metrics.get("explainer_init", "unknown")
    if metrics.get("black_box"):
        return (
            f"The Explainer is black-box, as the paper's: it learned from the classifier's outputs alone "
            f"(explainer.init={init}; the classifier was only called, never read)."
        )
    return (
        f"The Explainer is NOT the paper's black-box method (explainer.init={init}): it starts from the "
        f"classifier's own weights, a white-box variant."
    )


def _link(value: str) -> str:
    text = html.escape(str(value))
    if str(value).startswith(("/", "http://", "https://")):
        href = str(value) if not str(value).startswith("/") else f"file://{value}"
        return f"<a href='{html.escape(href)}'>{text}</a>"
    return f"<code>{text}</code>"


def run_quickstart(
    workdir: str = "runs/quickstart",
    with_stack: bool = False,
    on_stage: Callable[[str, int, int, str], None] | None = None,
    overrides: list[str] = (),
    num_images: int = 2000,
    num_corpus: int = 200,
) -> dict:
    """The whole main job; see the module docstring.

    Args:
        workdir: local folder for everything (with ``with_stack``: for the report; the rest goes to S3).
        with_stack: use the running ``wysiwyc stack`` instead of the embedded defaults.
        on_stage: called as ``(stage, index, total, "start" | "done in N s")`` for a progress display.
        overrides: ``key=value`` applied to every stage's config last (e.g. ``trainer.epochs=2``).
        num_images: synthetic training images (val and test have 100 each).
        num_corpus: images of the held-apart corpus that the attribution stage explains.

    Returns:
        The summary: ``report``, ``model_uri``, ``version``, ``checkpoint``, ``metrics``, ``output``,
        ``timings`` (seconds per stage), ``mlflow_ui`` (the command that opens the MLflow UI).
    """

    place = _place(workdir, with_stack)
    timings: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], dict | None]):
        index = STAGES.index(name) + 1
        if on_stage:
            on_stage(name, index, len(STAGES), "start")
        started = time.perf_counter()
        result = fn() or {}
        timings[name] = round(time.perf_counter() - started, 1)
        if on_stage:
            on_stage(name, index, len(STAGES), f"done in {timings[name]:.0f} s")
        return result

    user = list(overrides)
    classifier_cfg = _config(place, "classifier.yaml", user=user)
    opts = classifier_cfg.storage.options()
    # a fresh run each time: training resumes by run name, so the last run's checkpoints would be reused
    storage.delete_prefix(place.url("checkpoints"), opts)
    readers = max(
        cfg.trainer.num_workers * max(1, cfg.data.loader_workers)
        for cfg in (classifier_cfg, _config(place, "explainer.yaml", user=user))
    )
    size = classifier_cfg.data.image_size
    stage("data", lambda: {"counts": _make_data(place, size, num_images, num_corpus, readers, opts)})
    classifier = stage("classifier", lambda: train_classifier(classifier_cfg))
    explainer_cfg = _config(place, "explainer.yaml", f"explanandum.model={classifier['checkpoint']}", user=user)
    explainer = stage("explainer", lambda: train_explainer(explainer_cfg))
    evaluation_dir = place.url("evaluation")
    evaluate_cfg = _config(
        place,
        "evaluate.yaml",
        f"explainer.checkpoint={explainer['checkpoint']}",
        f"output={evaluation_dir}",
        f"evaluate.methods=[{','.join(m for m in EvaluateConfig().methods if m not in QUICKSTART_SKIPS)}]",
        user=user,
    )
    evaluation = stage("evaluate", lambda: evaluate(evaluate_cfg, progress=True))
    metrics = json.loads(storage.read_bytes(storage.join(evaluation_dir, "metrics.json"), opts))

    registered = stage(
        "register", lambda: _register_both(classifier["checkpoint"], explainer["checkpoint"], evaluate_cfg, metrics)
    )
    promoted = stage("promote", lambda: _gate_and_promote(registered, evaluate_cfg))
    champion, promotion = _champion(place, registered, promoted)

    attribute_cfg = _config(
        place,
        "attribute.yaml",
        f"explainer.checkpoint=models:/{MODEL_NAME}@champion",
        f"attribute.input={place.url(CORPUS[0])}",
        f"output={place.url('attributions')}",
        # the corpus is one output batch: a second actor only adds its start-up (31 → 23 s measured)
        "attribute.num_actors=1",
        user=user,
    )
    attribution = stage("attribute", lambda: attribute(attribute_cfg, progress=True))

    report_path = place.local / "report.html"
    links = {
        "report": str(report_path),
        "evaluation (metrics.json, plots)": evaluation["output"],
        "attribution preview (index.html)": attribution.get("preview"),
        "attribution index (Parquet parts)": attribution.get("index"),
        "Explainer checkpoint": explainer["checkpoint"],
        "classifier checkpoint": classifier["checkpoint"],
        "registered model": f"models:/{MODEL_NAME}@champion = models:/{MODEL_NAME}/{champion}",
        "registered classifier": registered["classifier"]["model_uri"],
        "promotion": promotion,
        "MLflow": place.tracking_uri,
    }
    stage(
        "report",
        lambda: write_report(
            report_path,
            metrics=metrics,
            evaluation_dir=evaluation_dir,
            loss=explainer_cfg.loss.model_dump(),
            timings=dict(timings),
            links=links,
            opts=opts,
            explainer=_net_and_schedule(explainer_cfg),
        ),
    )
    timings["total"] = round(sum(timings.values()), 1)
    return {
        "report": str(report_path),
        "checkpoint": explainer["checkpoint"],
        "model_uri": f"models:/{MODEL_NAME}@champion",
        "version": champion,
        "promotion": promotion,
        "metrics": evaluation["metrics"],
        "output": place.root,
        "table": evaluation.get("table"),
        "attribution": attribution["output"],
        "num_samples": attribution.get("num_samples"),
        "timings": timings,
        "mlflow_ui": _mlflow_ui(place),
    }


def _register_both(classifier: str, explainer: str, config, metrics: dict) -> dict:
    """The classifier first (the Explainer's version records the classifier's), then the Explainer with its
    evaluation's numbers."""
    explainer_metrics = {
        f"eval_{k}": float(v)
        for k, v in metrics["methods"]["explainer"].items()
        if isinstance(v, (int, float)) and math.isfinite(v)
    }
    clf = register_classifier(classifier, CLASSIFIER_NAME, config)
    expl = register_checkpoint(explainer, MODEL_NAME, config, extra_metrics=explainer_metrics)
    return {**expl, "classifier": clf}


def _gate_and_promote(registered: dict, config) -> dict:
    """The classifier and its Explainer go to @champion together; when the gate refuses the Explainer, the
    classifier goes back too (the champion pair of an earlier quickstart stays, if there is one)."""
    clf = promote(CLASSIFIER_NAME, registered["classifier"]["version"], config)
    try:
        return promote(MODEL_NAME, registered["version"], config, str(config.registry.gate))
    except WysiwycError as exc:
        if clf["previous_champion"] not in (None, clf["version"]):
            rollback(CLASSIFIER_NAME, config)
        return {"refused": str(exc)}


def _champion(place: Place, registered: dict, promoted: dict) -> tuple[str, str]:
    """``(the @champion version, a line saying how it got there)``; an error when there is none."""
    try:
        _, champion = resolve_model(f"models:/{MODEL_NAME}@champion", place.tracking_uri)
    except WysiwycError:
        raise WysiwycError(
            f"quickstart: the gate refused the new Explainer and there is no earlier champion "
            f"to attribute with: {promoted['refused']}"
        ) from None
    if "refused" not in promoted:
        return champion, f"v{champion} is @champion"
    return champion, f"v{registered['version']} refused by the gate, v{champion} stays @champion: {promoted['refused']}"


def _mlflow_ui(place: Place) -> str:
    if place.tracking_uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {place.tracking_uri} --port 5000  # then open http://127.0.0.1:5000"
    return f"open {place.tracking_uri}"
