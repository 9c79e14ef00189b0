"""The evaluate stage (pipeline.evaluate.evaluate) on tiny synthetic shards and untrained models.

One evaluation run (module fixture) on 24 synthetic 32-px images with a freshly built ``small_cnn``
Explanandum and ``compact`` Explainer; the tests read what it wrote. Untrained models say nothing
about quality, but the contract (keys, shapes, files), the reference methods (ideal = perfect,
zeros = nothing) and the refusals do not depend on training.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import classifier_state, explainer_state
from PIL import Image

from pipeline import storage
from pipeline.checkpoint import save_checkpoint
from pipeline.config import Config, EvaluateConfig, IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.shards import ShardDataset
from pipeline.data.synthetic import SyntheticReader
from pipeline.data.voc import paper_seg_luminance
from pipeline.errors import WysiwycError
from pipeline.evaluate import evaluate as evaluate_module
from pipeline.evaluate import report
from pipeline.evaluate.evaluate import (
    METHODS,
    PaperTruthShards,
    f1_at_thresholds,
    merge_present,
)
from pipeline.evaluate.evaluate import evaluate as run_evaluate
from pipeline.method.metrics import (
    foreground_and_valid,
    paper_foreground,
    segmentation_scores,
)

torch.set_num_threads(1)

SIZE = 32
NUM_IMAGES = 24
CONTRACT_METRICS = {
    "mean_f1",
    "cont_f1",
    "accuracy",
    "discrete_iou",
    "cont_iou",
    "auc",
    "saliency",
    "background_coverage",
    "object_coverage",
    "masks_per_second",
    "nan_masks",
    # faithfulness to the classifier and localisation, with their bootstrap intervals
    "deletion_auc",
    "insertion_auc",
    "pointing_game",
    "relevance_mass",
    "average_drop",
    "average_increase",
    "road_morf",
    "road_lerf",
    "faithfulness_ci95",
    "ci95",  # every metric's 95% bootstrap interval over images
    "settings",  # what the method ran with (a baseline's knobs, the paper's where ours differ)
}


def _config(workdir, **overrides) -> Config:
    tree = {
        "data": {"test": str(workdir / "data" / "test"), "loader_workers": 0},
        "explainer": {"checkpoint": str(workdir / "explainer.pt")},
        "output": str(workdir / "out"),
        "evaluate": {
            "rise_masks": 48,
            "rise_batch_size": 48,
            "batch_size": 8,
            "overlay_images": 4,
            "extremal_steps": 4,
            "igos_iterations": 2,
            "igos_ig_steps": 2,
            "rt_saliency_checkpoint": str(workdir / "rt_saliency.pt"),
        },
    }
    for dotted, value in overrides.items():
        node = tree
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return Config.model_validate(tree)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    reader = SyntheticReader(NUM_IMAGES, seed=3, split="test", image_size=SIZE)
    ingest(reader, str(root / "data"), "test", IngestConfig(workers=1, shard_size=12), progress=False)
    plain = SyntheticReader(6, seed=3, split="plain", image_size=SIZE, segmentation=False)
    ingest(plain, str(root / "data"), "plain", IngestConfig(workers=1, shard_size=6), progress=False)
    classes = list(reader.classes)
    classifier = str(root / "classifier.pt")
    sha = save_checkpoint(classifier_state(classes, SIZE, seed=0), classifier)
    save_checkpoint(explainer_state(classes, SIZE, classifier, sha), str(root / "explainer.pt"))
    rt = explainer_state(classes, SIZE, classifier, sha, loss_kind="rt_saliency")
    save_checkpoint(rt, str(root / "rt_saliency.pt"))
    return root


@pytest.fixture(scope="module")
def run(workdir):
    summary = run_evaluate(_config(workdir), progress=False)
    metrics = json.loads((workdir / "out" / "metrics.json").read_text())
    return summary, metrics


def _test_labels(workdir) -> torch.Tensor:
    ds = ShardDataset(str(workdir / "data" / "test"), image_size=SIZE, train=False)
    return torch.stack([s["labels"] for s in ds])


def test_metrics_json_has_exactly_the_contract_keys_for_every_method(run):
    _, metrics = run
    assert set(metrics) == {
        "protocol",
        "explainer_init",
        "black_box",
        "methods",
        "class_specificity",
        "num_images",
        "f1_curve",
        "faithfulness",
        "faithfulness_curves",
        "classes",
        "paired",
    }
    assert metrics["protocol"] == "project"
    assert metrics["classes"]["unmatched_classifier"] == metrics["classes"]["unmatched_split"] == []
    # a checkpoint without the records (written before they existed): unknown / null
    assert metrics["explainer_init"] == "unknown" and metrics["black_box"] is None
    assert list(metrics["methods"]) == list(METHODS)
    for method, values in metrics["methods"].items():
        assert set(values) == CONTRACT_METRICS, method
        assert values["masks_per_second"] > 0, method
        assert values["nan_masks"] == 0, method
    assert set(metrics["class_specificity"]) == {
        "explainer",
        "grad_cam",
        "rise",
        "extremal_perturbation",
        "igos_pp",
        "rt_saliency",
        "ideal",
    }
    for curve in metrics["f1_curve"].values():
        assert curve["thresholds"] == pytest.approx([0.05 * k for k in range(1, 20)])
        assert len(curve["f1"]) == 19


def test_every_metric_has_its_interval_and_the_explainer_its_paired_difference_to_each_baseline(run, workdir):
    """ci95 per metric of every method (the mean inside it, or a point interval for a metric with one value); paired:
    Explainer − baseline per image for the headline metrics, the mean difference the difference of the means where
    both are defined on the same images, its interval around it; metrics.md shows them."""
    _, metrics = run
    methods = metrics["methods"]
    for method, values in methods.items():
        for key, (lo, hi) in values["ci95"].items():
            if values.get(key) is None or lo is None:
                continue
            assert lo - 1e-9 <= values[key] <= hi + 1e-9, (method, key)
        assert set(values["ci95"]) >= {"cont_iou", "mean_f1", "saliency", "deletion_auc", "insertion_auc"}
    baselines = {"grad_cam", "rise", "extremal_perturbation", "igos_pp", "rt_saliency"}
    assert set(metrics["paired"]) == baselines
    for baseline, deltas in metrics["paired"].items():
        headline = {"cont_iou", "mean_f1", "gap", "deletion_auc", "insertion_auc", "road_morf", "road_lerf"}
        assert set(deltas) == headline, baseline
        for key in headline - {"gap"}:
            entry = deltas[key]
            # every labelled image has both values: the paired mean is the difference of the means
            assert entry["delta"] == pytest.approx(methods["explainer"][key] - methods[baseline][key], abs=1e-9)
            lo, hi = entry["ci95"]
            assert lo <= entry["delta"] <= hi, (baseline, key)
            # the RT-Saliency checkpoint here holds the Explainer's own (untrained) weights: no difference at all
            assert (hi - lo > 0) != (baseline == "rt_saliency" and entry["delta"] == lo == hi == 0), (baseline, key)
        spec = metrics["class_specificity"]
        gap = deltas["gap"]
        assert gap["delta"] == pytest.approx(spec["explainer"]["gap"] - spec[baseline]["gap"], abs=1e-9)
        assert gap["ci95"][0] <= gap["delta"] <= gap["ci95"][1]
    settings = {m: methods[m]["settings"] for m in ("rise", "grad_cam", "extremal_perturbation", "igos_pp")}
    assert settings["rise"] == {"masks": 48, "paper_masks": 8000, "grid": 7, "p": 0.5}
    assert settings["grad_cam"] == {"layer": "blocks.3"}  # small_cnn's last block, the paper's choice
    assert (
        settings["extremal_perturbation"]["steps"] == 4 and settings["extremal_perturbation"]["reward"] == "contrastive"
    )
    assert settings["igos_pp"] == {
        "iterations": 2,
        "paper_iterations": 20,
        "ig_steps": 2,
        "paper_ig_steps": 15,
        "mask_side_at_224": 28,
        "score": "softmax",
        "baseline": "blur",
    }
    text = (workdir / "out" / "metrics.md").read_text()
    assert "iGOS++ 2 iterations of 2 integration steps (NN-Explainer's: 20 of 15)" in text
    assert "RISE 48 masks (the paper's: 8,000), 7×7 cells, p 0.5" in text and "4 steps (the paper's: 800)" in text
    assert "− each baseline, paired" in text and "| Grad-CAM |" in text.split("− each baseline, paired")[1]


def test_every_labelled_test_image_is_evaluated(run, workdir):
    summary, metrics = run
    labelled = int((_test_labels(workdir).sum(1) > 0).sum())
    assert metrics["num_images"] == summary["num_images"] == labelled
    assert summary["skipped_unlabelled"] == NUM_IMAGES - labelled


def test_ideal_mask_scores_perfectly_and_zero_mask_scores_nothing(run):
    _, metrics = run
    ideal, zeros, ones = (metrics["methods"][m] for m in ("ideal", "zeros", "ones"))
    assert ideal["cont_iou"] == 1.0
    assert ideal["mean_f1"] == pytest.approx(1.0, abs=1e-6)
    assert ideal["discrete_iou"] == pytest.approx(1.0, abs=1e-6)
    assert ideal["auc"] == pytest.approx(1.0, abs=1e-6)
    assert ideal["background_coverage"] == 0.0 and ideal["object_coverage"] == 1.0
    assert zeros["cont_iou"] == 0.0 and zeros["mean_f1"] == pytest.approx(0.0, abs=1e-6)
    # the all-ones mask keeps the whole image: object and background coverage are both 1
    assert ones["object_coverage"] == 1.0 and ones["background_coverage"] == 1.0
    # the ideal F1 curve is 1 at every threshold, the zero mask's 0
    assert metrics["f1_curve"]["ideal"]["f1"] == pytest.approx([1.0] * 19, abs=1e-6)
    assert metrics["f1_curve"]["zeros"]["f1"] == pytest.approx([0.0] * 19, abs=1e-6)


def test_class_specificity_is_c_by_c_with_null_only_where_no_image_has_both_classes(run, workdir):
    _, metrics = run
    labels = _test_labels(workdir)
    labels = labels[labels.sum(1) > 0]
    together = (labels.T @ labels) > 0  # [r, c]: some image holds both r and c
    C = labels.shape[1]
    for method, spec in metrics["class_specificity"].items():
        assert len(spec["classes"]) == C
        matrix = spec["matrix"]
        assert len(matrix) == C and all(len(row) == C for row in matrix), method
        for r in range(C):
            for c in range(C):
                if together[r, c]:
                    assert matrix[r][c] is not None and 0.0 <= matrix[r][c] <= 1.0, (method, r, c)
                else:
                    assert matrix[r][c] is None, (method, r, c)
        # the gap and its bootstrap interval over the test images travel with the matrix
        assert spec["gap"] == pytest.approx(report.specificity_gap(matrix)), method
        lo, hi = spec["gap_ci95"]
        assert -1.0 <= lo <= hi <= 1.0, method


def test_pictures_are_written_and_open_at_a_reasonable_size(run, workdir):
    summary, _ = run
    out = workdir / "out"
    names = ["f1_vs_threshold.png", "overlays.png", "faithfulness_curves.png"] + [
        f"class_specificity_{m}.png"
        for m in ("explainer", "grad_cam", "rise", "extremal_perturbation", "igos_pp", "rt_saliency", "ideal")
    ]
    for name in names:
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            assert im.format == "PNG"
            assert 200 <= im.width <= 4000 and 200 <= im.height <= 4000, (name, im.size)
    assert sorted(summary["figures"]) == sorted(str(out / n) for n in names)
    # overlays: 4 rows of image, ground truth, per-class columns, 3 merged columns: wider than tall
    with Image.open(out / "overlays.png") as im:
        assert im.width > im.height * 0.9


def test_summary_has_the_contract_keys_and_a_markdown_table(run, workdir):
    summary, metrics = run
    out = workdir / "out"
    assert summary["metrics"] == str(out / "metrics.json")
    assert summary["report"] == str(out / "metrics.md")
    assert summary["output"] == str(out)
    assert set(summary["table"]) == set(METHODS)
    assert summary["table"]["ideal"] == {"cont_iou": 1.0, "mean_f1": metrics["methods"]["ideal"]["mean_f1"]}
    text = (out / "metrics.md").read_text()
    for title in ("Explainer", "Grad-CAM", "RISE", "Extremal Perturbations", "RT-Saliency", "ideal"):
        assert f"| {title} |" in text
    assert "Protocol: project" in text and "white-box" not in text
    assert summary["protocol"] == "project"
    assert "spec. gap" in text and "## Class specificity" in text
    lo, hi = metrics["class_specificity"]["explainer"]["gap_ci95"]
    assert f"[{lo:.2f}, {hi:.2f}]" in text
    assert (out / "config.yaml").is_file()


def test_selected_methods_only_and_max_images_with_loader_workers(workdir):
    config = _config(
        workdir,
        output=str(workdir / "out-few"),
        evaluate__methods=["ideal", "zeros"],
        evaluate__max_images=5,
        evaluate__overlay_images=2,
        data__loader_workers=2,
    )
    summary = run_evaluate(config, progress=False)
    metrics = json.loads((workdir / "out-few" / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["zeros", "ideal"]
    assert set(metrics["class_specificity"]) == {"ideal"}  # the only selected method with per-class masks
    assert summary["num_images"] + summary["skipped_unlabelled"] == 5


def test_a_tampered_explanandum_is_refused(workdir, tmp_path):
    classes = list(SyntheticReader(1, seed=0, split="x").classes)
    classifier = tmp_path / "classifier.pt"
    shutil.copy(workdir / "classifier.pt", classifier)
    sha = save_checkpoint(classifier_state(classes, SIZE, seed=0), str(classifier))
    save_checkpoint(explainer_state(classes, SIZE, str(classifier), sha), str(tmp_path / "explainer.pt"))
    save_checkpoint(classifier_state(classes, SIZE, seed=7), str(classifier))  # replaced after training
    config = _config(workdir, explainer__checkpoint=str(tmp_path / "explainer.pt"), output=str(tmp_path / "out"))
    with pytest.raises(WysiwycError, match=r"Explanandum .*classifier.pt.* is not the classifier the Explainer"):
        run_evaluate(config, progress=False)
    # the same with explanandum.checkpoint pointing at another classifier
    other = tmp_path / "other.pt"
    save_checkpoint(classifier_state(classes, SIZE, seed=9), str(other))
    config = _config(workdir, explanandum__checkpoint=str(other), output=str(tmp_path / "out"))
    with pytest.raises(WysiwycError, match=r"sha256 .* recorded"):
        run_evaluate(config, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_split_without_segmentation_is_refused(workdir, tmp_path):
    config = _config(workdir, data__test=str(workdir / "data" / "plain"), output=str(tmp_path / "out"))
    with pytest.raises(WysiwycError, match=r"plain.manifest.json has no segmentation"):
        run_evaluate(config, progress=False)


def test_a_registry_uri_that_does_not_resolve_is_refused_naming_it(workdir, tmp_path):
    config = _config(
        workdir,
        explainer__checkpoint="models:/wysiwyc@champion",
        output=str(tmp_path / "out"),
        tracking__uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    with pytest.raises(WysiwycError, match=r"models:/wysiwyc@champion: no registered model 'wysiwyc'"):
        run_evaluate(config, progress=False)
    assert not (tmp_path / "out").exists()


def _maker_with_masks_set_to(original, fill: float, touched: list):
    """A ``_mask_maker`` wrapping ``original`` whose masks are ``fill`` for every class of the first
    image of each batch and on one pixel of a class the second image does not hold (``touched``: per
    batch, the first image's classes, read from its class-index map)."""

    def maker(name, models, options, opts=None):
        make = original(name, models, options, opts)

        def patched(x, seg, y):
            maps = make(x, seg, y).clone()
            maps[0] = fill
            touched.append([k for k in range(maps.shape[1]) if (seg[0] == k + 1).any()])
            if maps.shape[0] > 1:
                absent = [k for k in range(maps.shape[1]) if not (seg[1] == k + 1).any()]
                maps[1, absent[0], 0, 0] = fill  # a class image 1 does not hold: used by no metric
            return maps

        return patched

    return maker


def test_nan_masks_score_as_all_zero_masks_in_every_metric_and_are_counted(workdir, monkeypatch):
    runs, original = {}, evaluate_module._mask_maker
    for label, fill in (("nan", math.nan), ("zero", 0.0)):
        touched: list = []
        monkeypatch.setattr(evaluate_module, "_mask_maker", _maker_with_masks_set_to(original, fill, touched))
        config = _config(workdir, output=str(workdir / f"out-{label}"), evaluate__methods=["explainer"])
        run_evaluate(config, progress=False)
        runs[label] = (json.loads((workdir / f"out-{label}" / "metrics.json").read_text()), touched)
    (nan, touched), (zero, _) = runs["nan"], runs["zero"]
    a, b = nan["methods"]["explainer"], zero["methods"]["explainer"]
    for key in CONTRACT_METRICS - {"masks_per_second", "nan_masks", "faithfulness_ci95", "ci95", "settings"}:
        assert a[key] is not None and a[key] == pytest.approx(b[key], abs=1e-9), key
    assert nan["f1_curve"]["explainer"]["f1"] == pytest.approx(zero["f1_curve"]["explainer"]["f1"], abs=1e-9)
    sa, sb = nan["class_specificity"]["explainer"], zero["class_specificity"]["explainer"]
    for row_a, row_b in zip(sa["matrix"], sb["matrix"]):
        assert [v is None for v in row_a] == [v is None for v in row_b]
        assert [v for v in row_a if v is not None] == pytest.approx([v for v in row_b if v is not None])
    assert sa["gap_ci95"] == pytest.approx(sb["gap_ci95"])
    # per batch: the first image's merged mask + its classes' masks (those the matrix uses); the
    # NaN in a class image 1 does not hold is neither used nor counted
    assert a["nan_masks"] == sum(1 + len(classes) for classes in touched) > 0
    assert b["nan_masks"] == 0
    assert "Masks holding NaN, scored as all-zero masks: Explainer" in (workdir / "out-nan" / "metrics.md").read_text()


def test_the_papers_protocol_beside_ours_is_the_paper_protocol_run_on_the_same_images(workdir):
    """evaluate.paper_table: a second pass under the paper's protocol, its headline numbers in metrics.json
    (paper_protocol) equal to a run of its own with evaluate.protocol=paper, and the side-by-side table in
    metrics.md."""
    methods = ["explainer", "grad_cam", "zeros", "ideal"]
    beside = _config(workdir, output=str(workdir / "out-beside"), evaluate__methods=methods, evaluate__paper_table=True)
    run_evaluate(beside, progress=False)
    metrics = json.loads((workdir / "out-beside" / "metrics.json").read_text())
    alone = _config(workdir, output=str(workdir / "out-paper"), evaluate__methods=methods, evaluate__protocol="paper")
    run_evaluate(alone, progress=False)
    paper = json.loads((workdir / "out-paper" / "metrics.json").read_text())
    assert metrics["protocol"] == "project" and set(metrics["paper_protocol"]) == set(methods)
    for method in methods:
        side = metrics["paper_protocol"][method]
        for key in ("cont_iou", "mean_f1", "saliency"):
            assert side[key] == pytest.approx(paper["methods"][method][key], abs=1e-9), (method, key)
        if method in paper["class_specificity"]:
            assert side["gap"] == pytest.approx(paper["class_specificity"][method]["gap"], abs=1e-9)
    # the protocol moves the numbers: here (no void, no resizing) the saliency, softmax summed over the classes
    moved = metrics["paper_protocol"]["explainer"]["saliency"] - metrics["methods"]["explainer"]["saliency"]
    assert abs(moved) > 1e-3
    text = (workdir / "out-beside" / "metrics.md").read_text()
    assert "## Ours and the paper's protocol, the same images" in text and " → " in text


def test_paper_protocol_reproduces_the_paper_evaluation(workdir):
    out = workdir / "out-paper"
    config = _config(
        workdir, output=str(out), evaluate__protocol="paper", evaluate__methods=["explainer", "zeros", "ones", "ideal"]
    )
    summary = run_evaluate(config, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == summary["protocol"] == "paper"
    ideal, zeros, ones = (metrics["methods"][m] for m in ("ideal", "zeros", "ones"))
    # the ideal mask is the paper's ground truth itself ("perfect")
    assert ideal["cont_iou"] == 1.0 and ideal["mean_f1"] == pytest.approx(1.0, abs=1e-6)
    assert zeros["object_coverage"] == 0.0 and ones["background_coverage"] == 1.0
    assert ones["saliency"] >= 0.0  # log 1 − log Σ softmax over the present classes, Σ ≤ 1
    # the notebook's matrix: every column (mask classes present or not) for every class some image holds
    labels = _test_labels(workdir)
    held = (labels[labels.sum(1) > 0].sum(0) > 0).tolist()
    for method, spec in metrics["class_specificity"].items():
        for r, row in enumerate(spec["matrix"]):
            if held[r]:
                assert all(v is not None and 0.0 <= v <= 1.0 for v in row), (method, r)
            else:
                assert all(v is None for v in row), (method, r)
    text = (out / "metrics.md").read_text()
    assert "Protocol: paper" in text and "binarised at 0.1…0.9" in text


def test_paper_ground_truth_is_made_from_the_source_resolution_segmentation(workdir):
    spec = str(workdir / "data" / "test")
    lut = paper_seg_luminance(voc=False)
    small = PaperTruthShards(spec, image_size=16, luminance=lut)
    source = ShardDataset(spec, image_size=SIZE, train=False)  # the synthetic images are SIZE px
    pairs = list(zip(small, source))
    assert len(pairs) == NUM_IMAGES
    for a, b in pairs:
        assert a["key"] == b["key"]
        expected = paper_foreground(b["seg"].numpy().astype("uint8"), 16, lut)
        assert a["paper_fg"].numpy().tolist() == expected.tolist(), a["key"]
        assert a["paper_fg"].sum() >= (a["seg"] != 0).sum()  # edges only grow the nearest-resized objects


def test_explainer_init_and_black_box_come_from_the_checkpoint_and_label_the_row(workdir, tmp_path):
    classes = list(SyntheticReader(1, seed=0, split="x").classes)
    sha = hashlib.sha256((workdir / "classifier.pt").read_bytes()).hexdigest()
    state = explainer_state(
        classes, SIZE, str(workdir / "classifier.pt"), sha, explainer_init="explanandum_copy", black_box=False
    )
    save_checkpoint(state, str(tmp_path / "explainer.pt"))
    config = _config(
        workdir,
        explainer__checkpoint=str(tmp_path / "explainer.pt"),
        output=str(tmp_path / "out"),
        evaluate__methods=["explainer", "zeros"],
        evaluate__max_images=6,
    )
    run_evaluate(config, progress=False)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["explainer_init"] == "explanandum_copy" and metrics["black_box"] is False
    text = (tmp_path / "out" / "metrics.md").read_text()
    assert "| Explainer (white-box init) |" in text
    html = report.metrics_html(
        metrics["methods"], metrics["class_specificity"], protocol=metrics["protocol"], black_box=metrics["black_box"]
    )
    assert "<td>Explainer (white-box init)</td>" in html and "Protocol: project" in html
    assert "<td>Explainer</td>" in report.metrics_html(metrics["methods"], black_box=True)


def test_rt_saliency_row_needs_an_rt_saliency_explainer_of_the_same_classifier(workdir, tmp_path):
    classes = list(SyntheticReader(1, seed=0, split="x").classes)
    sha = hashlib.sha256((workdir / "classifier.pt").read_bytes()).hexdigest()
    paper = tmp_path / "paper.pt"
    save_checkpoint(explainer_state(classes, SIZE, str(workdir / "classifier.pt"), sha), str(paper))
    other = tmp_path / "other.pt"
    save_checkpoint(explainer_state(classes, SIZE, "elsewhere.pt", "0" * 64, loss_kind="rt_saliency"), str(other))
    for checkpoint, message in (
        (paper, r"rt_saliency_checkpoint=.*paper.pt was trained with loss.kind=paper"),
        (other, r"rt_saliency_checkpoint=.*other.pt explains the classifier with sha256 0000"),
    ):
        config = _config(
            workdir,
            output=str(tmp_path / "out"),
            evaluate__methods=["explainer", "rt_saliency"],
            evaluate__rt_saliency_checkpoint=str(checkpoint),
        )
        with pytest.raises(WysiwycError, match=message):
            run_evaluate(config, progress=False)
    with pytest.raises(ValueError, match=r"evaluate.methods has rt_saliency but evaluate.rt_saliency_checkpoint"):
        _config(workdir, evaluate__methods=["rt_saliency"], evaluate__rt_saliency_checkpoint=None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("method", "function", "overrides", "expected"),
    [
        # the areas sorted (by the config), the steps
        (
            "extremal_perturbation",
            "extremal_pairs",
            {"evaluate__extremal_areas": [0.3, 0.1]},
            {"areas": [0.1, 0.3], "steps": 4},
        ),
        ("igos_pp", "igos.igos_pp_pairs", {}, {"iterations": 2, "ig_steps": 2}),
    ],
)
def test_the_per_image_optimisations_mask_only_the_present_classes(
    workdir, monkeypatch, method, function, overrides, expected
):
    """Extremal Perturbations and iGOS++ optimise one mask per (image, present class) pair, with their settings."""
    owner = evaluate_module.igos if function.startswith("igos.") else evaluate_module  # the name evaluate calls
    name = function.split(".")[-1]
    calls = []
    original = getattr(owner, name)

    def spy(model, x, image_of, class_of, **settings):
        calls.append((image_of.tolist(), class_of.tolist(), settings))
        return original(model, x, image_of, class_of, **settings)

    monkeypatch.setattr(owner, name, spy)
    out = workdir / f"out-{method}"
    config = _config(workdir, output=str(out), evaluate__methods=[method], evaluate__max_images=8, **overrides)
    run_evaluate(config, progress=False)
    labels = _test_labels(workdir)[:8]
    labels = labels[labels.sum(1) > 0]
    image_of, class_of = (labels > 0.5).nonzero(as_tuple=True)
    assert [(i, c) for call in calls for i, c in zip(call[0], call[1])] == list(
        zip(image_of.tolist(), class_of.tolist())
    )
    assert all(call[2] == expected for call in calls)
    row = json.loads((out / "metrics.json").read_text())["methods"][method]
    assert row["masks_per_second"] > 0 and row["nan_masks"] == 0 and 0 <= row["cont_iou"] <= 1


def test_search_on_val_picks_each_baselines_knob_and_reads_test_once(workdir, monkeypatch):
    """evaluate.search: every candidate on the validation split alone (its value what an evaluation of that split with
    that setting gives), the best by the metric kept, the test split read once with it; metrics.json and metrics.md
    record the candidates."""
    val = str(workdir / "data" / "val")
    reader = SyntheticReader(12, seed=4, split="val", image_size=SIZE)
    ingest(reader, str(workdir / "data"), "val", IngestConfig(workers=1, shard_size=12), progress=False)
    opened = []
    original = evaluate_module.open_test_split

    def spy(config, *args, **kwargs):
        opened.append(config.data.test)
        return original(config, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "open_test_split", spy)
    search = {"grad_cam": {"layer": ["blocks.2", "blocks.3"]}, "rise": {"grid": [3, 5], "p": [0.5]}}
    common = {"evaluate__faithfulness_images": 0, "evaluate__max_images": 12}
    config = _config(
        workdir,
        output=str(workdir / "out-search"),
        data__val=val,
        evaluate__methods=["explainer", "grad_cam", "rise"],
        evaluate__search=search,
        **common,
    )
    run_evaluate(config, progress=False)
    assert opened == [val] * 4 + [config.data.test]
    metrics = json.loads((workdir / "out-search" / "metrics.json").read_text())
    record = metrics["search"]
    assert set(record) == {"grad_cam", "rise"}
    assert [c["settings"] for c in record["rise"]["candidates"]] == [{"grid": 3, "p": 0.5}, {"grid": 5, "p": 0.5}]
    for entry in record.values():
        assert entry["metric"] == "cont_iou" and entry["split"] == val
        best = max(entry["candidates"], key=lambda c: c["value"])
        assert entry["chosen"] == best["settings"]
    assert metrics["methods"]["rise"]["settings"]["grid"] == record["rise"]["chosen"]["grid"]
    assert metrics["methods"]["grad_cam"]["settings"]["layer"] == record["grad_cam"]["chosen"]["layer"]
    # a candidate's value is the val split's own number with that setting
    alone = _config(
        workdir,
        output=str(workdir / "out-val"),
        data__test=val,
        evaluate__methods=["rise"],
        evaluate__rise_grid=3,
        **common,
    )
    run_evaluate(alone, progress=False)
    val_row = json.loads((workdir / "out-val" / "metrics.json").read_text())["methods"]["rise"]
    assert record["rise"]["candidates"][0]["value"] == pytest.approx(val_row["cont_iou"], abs=1e-9)
    text = (workdir / "out-search" / "metrics.md").read_text()
    assert "## Baseline settings chosen on the validation split" in text and text.count("(chosen)") == 2


def test_a_search_needs_a_validation_split_and_known_knobs(workdir):
    with pytest.raises(ValueError, match="search.rise: knobs.*cells.*choose from grid, p"):
        EvaluateConfig(search={"rise": {"cells": [5]}})
    with pytest.raises(ValueError, match="'ideal' has no knob"):
        EvaluateConfig(search={"ideal": {"layer": ["x"]}})
    config = _config(workdir, output=str(workdir / "out-noval"), evaluate__search={"rise": {"grid": [3]}})
    with pytest.raises(WysiwycError, match="set data.val"):
        run_evaluate(config, progress=False)


def test_unknown_method_is_a_config_error():
    with pytest.raises(ValueError, match="unknown method.*grad_cam"):
        EvaluateConfig(methods=["explainer", "gradcam"])


@pytest.mark.s3
def test_checkpoints_shards_and_outputs_on_s3(s3_server, s3_bucket, workdir):
    base, opts = f"s3://{s3_bucket}/eval", s3_server.opts
    reader = SyntheticReader(6, seed=3, split="test", image_size=SIZE)
    ingest(reader, f"{base}/data", "test", IngestConfig(workers=1, shard_size=6), opts=opts, progress=False)
    classes = list(reader.classes)
    sha = save_checkpoint(classifier_state(classes, SIZE, seed=0), f"{base}/classifier.pt", opts)
    save_checkpoint(explainer_state(classes, SIZE, f"{base}/classifier.pt", sha), f"{base}/explainer.pt", opts)
    config = _config(
        workdir,
        data__test=f"{base}/data/test",
        explainer__checkpoint=f"{base}/explainer.pt",
        output=f"{base}/out",
        evaluate__methods=["explainer", "ideal"],
        storage__endpoint_url=s3_server.endpoint,
        storage__region=s3_server.region,
        storage__access_key_id=s3_server.access_key,
        storage__secret_access_key=s3_server.secret_key,
    )
    summary = run_evaluate(config, progress=False)
    assert summary["metrics"] == f"{base}/out/metrics.json" and summary["output"] == f"{base}/out"
    metrics = json.loads(storage.read_bytes(summary["metrics"], opts))
    assert metrics["num_images"] == summary["num_images"] > 0
    assert metrics["methods"]["ideal"]["cont_iou"] == 1.0
    for name in ("metrics.md", "f1_vs_threshold.png", "overlays.png", "class_specificity_explainer.png"):
        assert storage.exists(f"{base}/out/{name}", opts), name
    written_config = storage.read_text(f"{base}/out/config.yaml", opts)
    assert s3_server.secret_key not in written_config and s3_server.secret_key not in json.dumps(summary)


# ------------------------------------------------------------------------ helpers, by hand


def test_f1_curve_matches_the_discrete_f1_of_segmentation_scores():
    torch.manual_seed(0)
    seg = torch.randint(0, 3, (3, 8, 8))
    seg[0, :2] = 255
    fg, valid = foreground_and_valid(seg)
    mask = torch.rand(3, 8, 8)
    curve = f1_at_thresholds(mask, fg, valid, thresholds=(0.25, 0.5, 0.75))
    scores = segmentation_scores(mask, fg, valid)
    for j, key in enumerate(("d_f1_25", "d_f1_50", "d_f1_75")):
        torch.testing.assert_close(curve[:, j], scores[key])


def test_merge_present_is_the_pixelwise_max_over_the_image_classes():
    maps = torch.tensor([[[[0.2]], [[0.9]], [[0.5]]], [[[0.7]], [[0.1]], [[0.3]]]])  # (2, 3, 1, 1)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert merge_present(maps, labels).flatten().tolist() == pytest.approx([0.5, 0.0])
    maps[0, 1] = math.nan  # a NaN in an absent class's mask does not reach the merged mask
    assert merge_present(maps, labels).flatten().tolist() == pytest.approx([0.5, 0.0])


def test_specificity_gap_ignores_cells_without_images():
    matrix = [[0.9, 0.1, None], [0.3, 0.7, None], [None, None, None]]
    assert report.specificity_gap(matrix) == pytest.approx(0.8 - 0.2)
    assert math.isnan(report.specificity_gap([[None]]))


def test_specificity_heatmap_is_a_png_of_the_classes_the_split_holds():
    data = report.class_specificity_png([[0.9, None], [0.2, 0.8]], ["a", "b"], "explainer")
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "PNG" and im.width > 200
    # a 5-class split in a 20-class layout: 15 classes no image holds have no cell and are left out
    matrix = np.full((20, 20), np.nan)
    held = [1, 4, 7, 11, 19]
    for r in held:
        for c in held:
            matrix[r, c] = 0.9 if r == c else 0.1
    matrix[4, 7] = np.nan  # one pair no image holds together: the classes stay
    assert report.held_classes(matrix) == held
    names = [f"c{k}" for k in range(20)]
    small = report.class_specificity_png(matrix.tolist(), names, "explainer")
    full = report.class_specificity_png(np.where(np.isnan(matrix), 0.0, matrix).tolist(), names, "explainer")
    with Image.open(io.BytesIO(small)) as a, Image.open(io.BytesIO(full)) as b:
        assert a.height < 0.6 * b.height  # drawn at the size of 5 classes, not 20


def test_faithfulness_metrics_of_every_method_are_stated_bounded_and_exact_for_the_ideal_mask(run, workdir):
    summary, metrics = run
    f = metrics["faithfulness"]
    assert f["images"] == metrics["num_images"] and f["steps"] == 20 and f["probability"] == "sigmoid"
    assert f["pointing_tolerance_px"] == pytest.approx(15 * SIZE / 224)
    for method, values in metrics["methods"].items():
        if method in ("zeros", "half", "ones"):  # a constant ranks no pixel: no curve, no pointing
            assert values["deletion_auc"] is values["insertion_auc"] is values["pointing_game"] is None
            assert values["road_morf"] is values["road_lerf"] is None
            assert method not in metrics["faithfulness_curves"] and 0.0 <= values["average_increase"] <= 1.0
            continue
        for key in ("deletion_auc", "insertion_auc", "pointing_game", "average_increase", "road_morf", "road_lerf"):
            assert 0.0 <= values[key] <= 1.0, (method, key)
            lo, hi = values["faithfulness_ci95"][key]
            assert lo <= values[key] <= hi, (method, key)
        curves = metrics["faithfulness_curves"][method]
        assert len(curves["deletion"]) == len(curves["insertion"]) == 21
        assert curves["deletion"][0] == pytest.approx(curves["insertion"][-1])  # both: the whole image
        assert len(curves["road_morf"]) == len(curves["road_lerf"]) == 9  # at 10 … 90% removed
    ideal, zeros = metrics["methods"]["ideal"], metrics["methods"]["zeros"]
    assert ideal["pointing_game"] == 1.0 and ideal["relevance_mass"] == pytest.approx(1.0)
    assert zeros["relevance_mass"] is None  # an all-zero map has no mass
    assert 0.0 <= zeros["average_drop"] <= 100.0 and 0.0 <= zeros["average_increase"] <= 1.0
    md = (workdir / "out" / "metrics.md").read_text()
    assert "## Faithfulness to the classifier and localisation" in md and "deletion AUC ↓" in md
    assert (workdir / "out" / "faithfulness_curves.png").stat().st_size > 1000


def test_faithfulness_can_be_limited_to_the_first_images_or_switched_off(workdir):
    out = workdir / "out-faithful"
    run_evaluate(
        _config(
            workdir,
            output=str(out),
            evaluate__methods=["explainer", "ideal"],
            evaluate__faithfulness_images=5,
            evaluate__faithfulness_steps=4,
        ),
        progress=False,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["faithfulness"]["images"] == 5 and len(metrics["faithfulness_curves"]["ideal"]["deletion"]) == 5
    off = workdir / "out-unfaithful"
    run_evaluate(
        _config(workdir, output=str(off), evaluate__methods=["ideal"], evaluate__faithfulness_images=0), progress=False
    )
    metrics = json.loads((off / "metrics.json").read_text())
    assert metrics["faithfulness"]["images"] == 0 and metrics["faithfulness_curves"] == {}
    assert "deletion_auc" not in metrics["methods"]["ideal"] and not (off / "faithfulness_curves.png").exists()


def test_classes_are_matched_by_name_between_the_classifier_and_the_split(workdir, tmp_path):
    """A classifier of 2 of the split's classes, in another order: evaluated on those, the others listed;
    a classifier sharing no name with the split is refused."""
    from pipeline.data.classes import SYNTHETIC_CLASSES, ClassMatch

    match = ClassMatch(["square", "circle"], SYNTHETIC_CLASSES, "test")
    batch = {
        "labels": torch.tensor([[1.0, 1.0, 0, 0, 0, 1.0]]),  # circle, square, ring
        "seg": torch.tensor([[[0, 1, 2, 6, 255]]]),
    }
    out = match.apply(batch)
    assert out["labels"].tolist() == [[1.0, 1.0]]  # in the classifier's order: square, circle
    assert out["seg"].tolist() == [[[0, 2, 1, 255, 255]]]  # ring: void (neither object nor background)
    assert match.summary() == {
        "matched": ["square", "circle"],
        "unmatched_classifier": [],
        "unmatched_split": ["triangle", "star", "cross", "ring"],
    }

    classes = ["square", "circle", "hexagon"]  # hexagon: not a class of the split
    classifier = str(tmp_path / "classifier.pt")
    sha = save_checkpoint(classifier_state(classes, SIZE, seed=0), classifier)
    save_checkpoint(explainer_state(classes, SIZE, classifier, sha), str(tmp_path / "explainer.pt"))
    config = _config(workdir, explainer__checkpoint=str(tmp_path / "explainer.pt"), output=str(tmp_path / "out"))
    config.evaluate.methods = ["explainer"]
    config.evaluate.faithfulness_images = 0
    summary = run_evaluate(config, progress=False)
    assert summary["classes"] == {
        "matched": ["square", "circle"],
        "unmatched_classifier": ["hexagon"],
        "unmatched_split": ["triangle", "star", "cross", "ring"],
    }
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert metrics["classes"] == summary["classes"]
    # the images with a circle or a square only (the others have no class of the classifier)
    shown = [s for s in ShardDataset(str(workdir / "data" / "test"), image_size=SIZE, train=False)]
    with_one = sum(1 for s in shown if s["labels"][:2].sum() > 0)
    assert 0 < summary["num_images"] == with_one < NUM_IMAGES

    other = str(tmp_path / "other.pt")
    sha = save_checkpoint(classifier_state(["cat", "dog"], SIZE, seed=0), other)
    save_checkpoint(explainer_state(["cat", "dog"], SIZE, other, sha), str(tmp_path / "disjoint.pt"))
    config = _config(workdir, explainer__checkpoint=str(tmp_path / "disjoint.pt"), output=str(tmp_path / "o2"))
    with pytest.raises(WysiwycError, match=r"none of the classifier's \['cat', 'dog'\]"):
        run_evaluate(config, progress=False)
