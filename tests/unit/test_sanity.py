"""The sanity check's pieces (pipeline.workflows.sanity): Spearman and SSIM against their peers (scipy,
scikit-image), the cascading re-initialisation, the label permutation and the verdict rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity

from pipeline.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.shards import ShardDataset, read_manifest
from pipeline.data.synthetic import SyntheticReader
from pipeline.models.explanandum import build_explanandum
from pipeline.workflows.sanity import randomize_top_layers, spearman, ssim, verdict, write_permuted_split

torch.set_num_threads(1)


def test_spearman_agrees_with_scipy_with_and_without_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5, 200, generator=g)
    b = a + 0.5 * torch.rand(5, 200, generator=g)
    tied_a = (a * 4).floor()  # few values: many ties, mean ranks
    tied_b = torch.where(b > 0.9, 1.0, b)  # saturated masks tie at 1
    for x, y in ((a, b), (tied_a, tied_b), (a, -a), (tied_a, b)):
        ours = spearman(x, y)
        peer = [spearmanr(x[i].numpy(), y[i].numpy()).statistic for i in range(len(x))]
        assert ours.tolist() == pytest.approx(peer, abs=1e-9)
    assert spearman(a[:1], -a[:1]).item() == pytest.approx(-1.0)
    assert torch.isnan(spearman(torch.ones(1, 10), a[:1, :10])).all()  # a constant map ranks nothing


def test_ssim_agrees_with_scikit_image():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(3, 32, 32, generator=g)
    b = (a + 0.3 * torch.rand(3, 32, 32, generator=g)).clamp(0, 1)
    smooth = torch.nn.functional.avg_pool2d(a.unsqueeze(1), 5, 1, 2)[:, 0]
    for x, y in ((a, b), (a, smooth), (a, a), (a, 1 - a)):
        ours = ssim(x, y)
        peer = []
        for i in range(len(x)):
            full = structural_similarity(
                x[i].double().numpy(),
                y[i].double().numpy(),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=1.0,
                full=True,
            )[1]
            peer.append(full[5:-5, 5:-5].mean())  # the positions whose 11×11 window fits (ours)
        assert ours.tolist() == pytest.approx(peer, abs=1e-9)
    assert ssim(a, a).tolist() == pytest.approx([1.0] * 3)


def test_top_layers_are_reinitialised_from_the_output_down_and_the_rest_kept():
    torch.manual_seed(0)
    model = build_explanandum("small_cnn", 5)
    for module in model.modules():  # trained-looking batch norms, so that their reset shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.fill_(2.0)
            module.running_mean.fill_(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = randomize_top_layers(model, layers=3, seed=0)
    # fc and the last block's two convs, with the batch norms registered after the lowest of them
    assert names == ["blocks.3.0", "blocks.3.1", "blocks.3.3", "blocks.3.4", "fc"]
    after = model.state_dict()
    changed = {k.rsplit(".", 1)[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(names)  # and nothing below
    # the default is the top half (5 of the 9 conv/linear layers); the same seed draws the same weights
    again = build_explanandum("small_cnn", 5)
    names = randomize_top_layers(again, seed=0)
    assert names[0] == "blocks.2.0" and names[-1] == "fc" and len(names) == 9  # 4 convs, 4 batch norms, fc
    twice = build_explanandum("small_cnn", 5)
    randomize_top_layers(twice, seed=0)
    a, b = again.state_dict(), twice.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k.rsplit(".", 1)[0] in names)


def test_labels_are_permuted_across_images_and_nothing_else_changes(tmp_path):
    reader = SyntheticReader(30, seed=2, split="train", image_size=24)
    ingest(reader, str(tmp_path / "data"), "train", IngestConfig(workers=1, shard_size=8), progress=False)
    url = write_permuted_split(str(tmp_path / "data" / "train"), str(tmp_path / "perm"), "train", seed=0)
    manifest = read_manifest(url)
    assert manifest["num_samples"] == 30 and manifest["source"]["kind"] == "permuted_labels"
    original = {s["key"]: s for s in ShardDataset(str(tmp_path / "data" / "train"), image_size=24, train=False)}
    permuted = {s["key"]: s for s in ShardDataset(url, image_size=24, train=False)}
    assert set(permuted) == set(original)
    for key, s in permuted.items():
        assert torch.equal(s["image"], original[key]["image"]) and torch.equal(s["seg"], original[key]["seg"])
    rows = lambda d: sorted(json.dumps(s["labels"].tolist()) for s in d.values())  # noqa: E731
    assert rows(permuted) == rows(original)  # the same label sets, handed to other images
    moved = sum(not torch.equal(permuted[k]["labels"], original[k]["labels"]) for k in original)
    assert moved >= 15
    again = write_permuted_split(str(tmp_path / "data" / "train"), str(tmp_path / "again"), "train", seed=0)
    assert read_manifest(again)["digest"] == manifest["digest"]  # the seed fixes the permutation


def test_the_verdict_needs_low_correlation_and_iou_halfway_to_the_constant_mask_for_both():
    scores = {
        "real": {"cont_iou": 0.5},
        "ones": {"cont_iou": 0.1},
        "randomized": {"cont_iou": 0.2, "spearman": 0.1},
        "permuted_labels": {"cont_iou": 0.3, "spearman": 0.4},
    }
    passed, checks = verdict(scores, max_spearman=0.5, iou_drop=0.5)
    assert passed and checks["randomized"]["iou_bound"] == pytest.approx(0.3)  # 0.5 − 0.5·(0.5 − 0.1)
    scores["permuted_labels"]["cont_iou"] = 0.31
    assert verdict(scores, 0.5, 0.5)[0] is False
    scores["permuted_labels"].update(cont_iou=0.3, spearman=0.5)
    passed, checks = verdict(scores, 0.5, 0.5)
    assert not passed and checks["permuted_labels"] == {"spearman_ok": False, "iou_ok": True, "iou_bound": 0.3}
    scores["permuted_labels"]["spearman"] = float("nan")  # constant masks: no ranking, no pass
    assert verdict(scores, 0.5, 0.5)[0] is False
    assert np.isfinite(checks["randomized"]["iou_bound"])
