"""iGOS++ (pipeline.evaluate.igos): its terms by hand, its baseline against OpenCV's blur, the whole optimisation
against the reference code NN-Explainer ran (GPL-3, read from a local clone of stevenstalder/NN-Explainer when one is
there, never copied into this repository), and a classifier whose evidence lies in one corner."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.evaluate import igos
from pipeline.method.faithfulness import gaussian_blur

torch.set_num_threads(1)

# a git directory of github.com/stevenstalder/NN-Explainer (the fetch tool's mirror on the project's machines)
REFERENCE_GIT = Path(os.environ.get("WYSIWYC_NN_EXPLAINER_GIT", "/work/.mirror/stevenstalder+NN-Explainer/repo"))
REFERENCE_DIR = "src/evaluation/IGOS_pp"


class CornerClassifier(nn.Module):
    """Class 0's logit: the high-frequency energy (a Laplacian's magnitude) in the top-left quarter of the image;
    classes 1 and 2 constant. Blurring that quarter takes class 0 away, nothing else touches it."""

    def __init__(self):
        super().__init__()
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.laplace = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        self.laplace.weight.data.copy_(kernel.expand(1, 3, 3, 3) / 3)
        self.requires_grad_(False)

    def forward(self, x):
        energy = self.laplace(x).abs()
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        z = 4.0 * energy[:, 0, :h, :w].mean(dim=(1, 2)) - 2.0
        return torch.stack([z, torch.zeros_like(z), torch.full_like(z, -1.0)], dim=1)


def _corner_image(size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.full((1, 3, size, size), 0.2)
    x[..., size // 8 : size // 2, size // 8 : size // 2] += 0.8 * (
        torch.rand(1, 3, 3 * size // 8, 3 * size // 8, generator=g) > 0.5
    )
    return x


def test_path_scores_and_bilateral_tv_by_hand(monkeypatch):
    """D(m) without noise: the mean of the K softmax scores along the path; BTV: the four means of squared
    differences, the image-space ones weighted as the reference weights them."""
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    model = CornerClassifier()
    x = _corner_image(16)
    base = igos.blurred_baseline(x)
    up = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    K = 3
    expected = (
        sum(torch.softmax(model(x * (k / K) * up + base * (1 - (k / K) * up)), dim=1)[0, 0] for k in (1, 2, 3)) / K
    )
    got = igos.path_score(model, x, base, up, torch.tensor([0]), K)
    assert float(got) == pytest.approx(float(expected), rel=1e-6)

    mask = torch.tensor([[[[1.0, 0.5], [0.0, 1.0]]]])  # 2 × 2, upsampled to 4 × 4
    image = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    m = mask[0, 0]
    a = ((m[0, 0] - m[1, 0]) ** 2 + (m[0, 1] - m[1, 1]) ** 2) / 2
    b = ((m[0, 0] - m[0, 1]) ** 2 + (m[1, 0] - m[1, 1]) ** 2) / 2
    u = igos.upscale(mask, (4, 4))[0, 0]
    assert torch.allclose(u[0], torch.tensor([1.0, 5 / 6, 2 / 3, 0.5]))  # corners aligned
    img = image[0]
    bil_a = np.mean([
        float(torch.exp(-((img[:, i, j] - img[:, i + 1, j]).mean() ** 2) / 0.01) * (u[i, j] - u[i + 1, j]) ** 2)
        for i in range(3) for j in range(4)
    ])  # fmt: skip
    bil_b = np.mean([
        float(torch.exp(-((img[:, i, j] - img[:, i, j + 1]) ** 2) / 0.01).mean() * (u[i, j] - u[i, j + 1]) ** 2)
        for i in range(4) for j in range(3)
    ])  # fmt: skip
    expected_tv = 0.5 * (float(a) + float(b) + bil_a + bil_b)
    assert float(igos.bilateral_tv(image, mask)) == pytest.approx(expected_tv, rel=1e-5)
    assert float(igos.regulariser(image, mask)) == pytest.approx(1.0 * 0.375 + 20.0 * expected_tv, rel=1e-5)


def test_the_baseline_is_opencvs_blur_at_224_px():
    """NN-Explainer's baseline, cv2.GaussianBlur(image, (51, 51), 50), on the same image (a linear filter: blurring
    the normalised image is normalising the blurred one)."""
    cv2 = pytest.importorskip("cv2")
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    ours = igos.blurred_baseline(x)[0].permute(1, 2, 0).numpy()
    theirs = cv2.GaussianBlur(x[0].permute(1, 2, 0).numpy(), (51, 51), sigmaX=50)
    assert np.abs(ours - theirs).max() < 1e-5
    # at 48 px the kernel and σ scale with the image: ±5 px, σ 10.7
    small = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    expected = cv2.GaussianBlur(small[0].permute(1, 2, 0).numpy(), (11, 11), sigmaX=50 * 48 / 224)
    assert np.abs(igos.blurred_baseline(small)[0].permute(1, 2, 0).numpy() - expected).max() < 1e-5
    assert torch.equal(gaussian_blur(small, 2.0), gaussian_blur(small, 2.0, radius=6))  # the default: ±⌈3σ⌉


def test_the_saliency_lies_where_the_classifier_reads():
    """The only evidence of class 0 is the texture in the top-left quarter: the map's mean there is well above its
    mean elsewhere; two pairs optimised together get what each gets alone (noise off: deterministic)."""
    torch.manual_seed(0)
    model = CornerClassifier()
    x = _corner_image(32)
    sal = igos.igos_pp(model, x, [[0]], iterations=10, ig_steps=5)[0, 0]
    assert sal.shape == (32, 32) and float(sal.min()) >= 0 and float(sal.max()) <= 1
    inside = float(sal[:16, :16].mean())
    outside = float((sal.sum() - sal[:16, :16].sum()) / (32 * 32 - 16 * 16))
    assert inside > outside + 0.3, (inside, outside)


def test_pairs_do_not_interact(monkeypatch):
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    model = CornerClassifier()
    x = torch.cat([_corner_image(32), _corner_image(32).flip(-1)])
    both = igos.igos_pp(model, x, [[0], [0]], iterations=4, ig_steps=3)
    alone = igos.igos_pp(model, x[1:], [[0]], iterations=4, ig_steps=3)
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-2)


def _reference_module() -> types.ModuleType:
    """NN-Explainer's iGOS++ (methods.py with methods_helper.py), read from its git directory, on the CPU."""
    if not (REFERENCE_GIT / "HEAD").exists():
        pytest.skip(f"no clone of stevenstalder/NN-Explainer at {REFERENCE_GIT} (WYSIWYC_NN_EXPLAINER_GIT)")

    def source(name: str) -> str:
        out = subprocess.run(
            ["git", "--git-dir", str(REFERENCE_GIT), "show", f"HEAD:{REFERENCE_DIR}/{name}"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    helper = types.ModuleType("methods_helper")
    exec(compile(source("methods_helper.py"), "methods_helper.py", "exec"), helper.__dict__)
    sys.modules["methods_helper"] = helper
    try:
        methods = types.ModuleType("igos_methods")
        exec(compile(source("methods.py"), "methods.py", "exec"), methods.__dict__)
    finally:
        del sys.modules["methods_helper"]
    return methods


def test_equal_to_the_reference_code_that_nn_explainer_ran(monkeypatch):
    """The same image, classifier and baseline through NN-Explainer's iGOS_pp (its .cuda() calls made no-ops, its
    noise off in both) and ours, then NN-Explainer's post-processing (upsample, min-max, 1 − mask): equal maps, in
    double precision (in float32 the two drift apart by rounding, 2·10⁻⁵ after 4 iterations, 3·10⁻⁴ after 6)."""
    methods = _reference_module()
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)
    real_ones = torch.ones

    def ones(*size, device=None, dtype=None, **kw):  # its masks: float32 on 'cuda'
        return real_ones(*size, dtype=torch.get_default_dtype() if dtype is torch.float32 else dtype, **kw)

    monkeypatch.setattr(torch, "ones", ones)
    torch.set_default_dtype(torch.float64)  # both in double precision: float32 rounding grows over the iterations
    try:
        model = CornerClassifier().double()
        x = _corner_image(32).double()
        methods.init(32)
        side, iterations, steps = 4, 6, 5
        mask = methods.iGOS_pp(
            model,
            images=x,
            baselines=igos.blurred_baseline(x),
            labels=torch.tensor([0]),
            size=side,
            iterations=iterations,
            ig_iter=steps,
            L1=1,
            L2=20,
            alpha=1000,
        ).detach()
        up = nn.UpsamplingBilinear2d(size=(32, 32))(mask.view(-1, 1, side, side))
        theirs = 1 - (up - up.min()) / (up.max() - up.min())
        ours = igos.igos_pp(model, x, [[0]], iterations=iterations, ig_steps=steps, size=side)
        assert float(theirs.std()) > 0.05  # the masks moved
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.allclose(ours[0, 0], theirs[0, 0], atol=1e-9)
