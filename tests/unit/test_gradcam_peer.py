"""Peer check of our batched Grad-CAM (pipeline.evaluate.baselines.gradcam) against the maintained
``grad-cam`` package (``pytorch_grad_cam`` 1.5.x, the library the paper's baseline script used), and
of the default target layers against the paper's code.

The package is called as its users call it: one ``GradCAM(model, target_layers=[layer])`` call per
class, ``targets=[ClassifierOutputTarget(c)] * B``, on the same frozen, eval-mode Explanandum
(``freeze_explanandum``; random weights, nothing downloaded) and the same images. What is aligned:

- The input is passed with ``requires_grad=True``: a frozen model has no parameter that requires grad,
  so without it the package's gradient hook never fires (ours makes the input carry the graph itself).
  This does not change any value: the gradient w.r.t. the target layer is the same.
- Upsampling: the package resizes with ``cv2.resize`` (INTER_LINEAR, half-pixel centres), ours with
  ``F.interpolate(bilinear, align_corners=False)``: the same bilinear rule. Inputs are non-square so a
  swapped (width, height) would show.
- Normalisation: ours is the exact ``(R − min) / (max − min)`` of the upsampled, ReLU'd map R; the
  package divides by ``max + 1e-7`` before its resize and again after it. Bilinear upsampling is
  linear (its weights sum to 1), so it commutes with that rescaling: the maps are compared directly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("pytorch_grad_cam", reason="grad-cam (the dev extra) is not installed")

from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from pipeline.data.synthetic import SyntheticReader  # noqa: E402
from pipeline.data.transforms import normalize  # noqa: E402
from pipeline.errors import WysiwycError  # noqa: E402
from pipeline.evaluate.baselines import gradcam, gradcam_target_layer  # noqa: E402
from pipeline.models.explanandum import build_explanandum, freeze_explanandum  # noqa: E402

torch.set_num_threads(1)

NUM_CLASSES = 4
CLASSES = [0, 1, 2, 3]
BATCH = 3
# (height, width): non-square, a multiple of each net's stride (small_cnn 8, vgg16 / resnet50 32)
SIZES = {"small_cnn": (40, 56), "vgg16": (64, 96), "resnet50": (64, 96)}


def _images(height: int, width: int, n: int = BATCH) -> torch.Tensor:
    """``n`` synthetic test images, ImageNet-normalised as the Explananda see them."""
    reader = SyntheticReader(n, seed=0, split="test", image_size=(width, height))
    x = torch.stack([torch.from_numpy(reader.render(i).image).permute(2, 0, 1) for i in range(n)])
    return normalize(x.float() / 255)


def _package_gradcam(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """pytorch-grad-cam as its users call it: one call per class column; ``classes`` is (B, K)."""
    cam = GradCAM(model=model, target_layers=[layer])
    try:
        maps = [
            cam(
                input_tensor=x.clone().requires_grad_(True),
                targets=[ClassifierOutputTarget(int(c)) for c in classes[:, k]],
            )
            for k in range(classes.shape[1])
        ]
    finally:
        cam.activations_and_grads.release()  # not `with`: its __exit__ swallows IndexError
    return torch.from_numpy(np.stack(maps, axis=1))  # (B, K, H, W)


def _paper_target_layer(model: nn.Module) -> nn.Module:
    """The paper's expression (NN-Explainer ``src/evaluation/grad_cam.py``) applied to our model.

    ``src/models/classifier.py`` builds ``feature_extractor`` as ``nn.Sequential(*vgg.features)`` (VGG16)
    or ``nn.Sequential(*list(resnet.children())[:-1])`` (ResNet-50); the Grad-CAM script then takes
    ``feature_extractor[-1]`` (VGG16) or ``feature_extractor[-2][-1]`` (ResNet-50).
    """
    if model.wysiwyc_arch == "vgg16":
        return nn.Sequential(*model.features)[-1]
    return nn.Sequential(*list(model.children())[:-1])[-2][-1]


@pytest.fixture(scope="module")
def peer_maps():
    """Per arch: (ours, package) maps (B, K, H, W) on the same frozen net and images, built once."""
    results = {}
    for arch, (height, width) in SIZES.items():
        torch.manual_seed(0)
        model = freeze_explanandum(build_explanandum(arch, NUM_CLASSES))
        x = _images(height, width)
        ours = gradcam(model, x, CLASSES)
        cls = torch.tensor(CLASSES).expand(BATCH, -1)
        results[arch] = (ours, _package_gradcam(model, x, cls, gradcam_target_layer(model)))
    return results


@pytest.mark.parametrize("arch", list(SIZES))
def test_gradcam_equals_pytorch_grad_cam_on_the_same_frozen_classifier(peer_maps, arch):
    ours, package = peer_maps[arch]
    height, width = SIZES[arch]
    assert ours.shape == package.shape == (BATCH, NUM_CLASSES, height, width)
    # not a vacuous comparison: most maps are non-zero (a random net's ReLU kills some classes)
    assert int((package.amax(dim=(2, 3)) > 0.5).sum()) >= BATCH * NUM_CLASSES // 2
    diff = (ours - package).abs().max().item()
    assert diff <= 1e-3, f"{arch}: max |ours − pytorch-grad-cam| = {diff:.3g}"


def test_gradcam_per_image_classes_equal_pytorch_grad_cam_per_image_targets():
    torch.manual_seed(1)
    model = freeze_explanandum(build_explanandum("small_cnn", NUM_CLASSES))
    x = _images(*SIZES["small_cnn"])
    cls = torch.tensor([[0, 3], [2, 2], [1, 0]])
    ours = gradcam(model, x, cls)
    package = _package_gradcam(model, x, cls, model.blocks[-1])
    assert ours.shape == package.shape == (BATCH, 2, *SIZES["small_cnn"])
    assert (ours - package).abs().max().item() <= 1e-3
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("arch", ["vgg16", "resnet50"])
def test_gradcam_target_layer_is_the_papers_layer(arch):
    model = build_explanandum(arch, NUM_CLASSES)
    layer = gradcam_target_layer(model)
    assert layer is _paper_target_layer(model)
    if arch == "vgg16":
        assert layer is model.features[30] and isinstance(layer, nn.MaxPool2d)  # after the last conv block
    else:
        assert layer is model.layer4[2]  # the last bottleneck of the last stage


def test_gradcam_target_layer_of_small_cnn_is_its_last_block():
    model = build_explanandum("small_cnn", NUM_CLASSES)
    assert gradcam_target_layer(model) is model.blocks[-1]


def test_gradcam_on_resnet_layer4_equals_its_last_bottleneck():
    torch.manual_seed(0)
    model = freeze_explanandum(build_explanandum("resnet50", NUM_CLASSES))
    x = _images(*SIZES["resnet50"], n=2)
    default = gradcam(model, x, [0, 2])
    assert torch.equal(default, gradcam(model, x, [0, 2], target_layer=model.layer4[-1]))
    assert torch.equal(default, gradcam(model, x, [0, 2], target_layer=model.layer4))  # the same tensor


def _tiny_vit() -> nn.Module:
    """A torchvision vision transformer at CPU size (32 px, 8-px patches: a 4 × 4 grid of tokens)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=NUM_CLASSES
    )
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at 0: no gradient
    return freeze_explanandum(model)


def test_gradcam_on_a_vit_equals_pytorch_grad_cam_with_its_reshape_transform():
    model = _tiny_vit()
    layer = gradcam_target_layer(model)
    assert layer is model.encoder.layers[-1].ln_1  # the package's documented choice for ViTs
    x = _images(32, 32)

    def reshape_transform(tensor, height=4, width=4):  # the package's ViT example (tutorials/vision_transformers)
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    cls = torch.tensor(CLASSES).expand(BATCH, -1)
    cam = GradCAM(model=model, target_layers=[layer], reshape_transform=reshape_transform)
    try:
        package = torch.from_numpy(
            np.stack(
                [
                    cam(
                        input_tensor=x.clone().requires_grad_(True),
                        targets=[ClassifierOutputTarget(int(c)) for c in cls[:, k]],
                    )
                    for k in range(NUM_CLASSES)
                ],
                axis=1,
            )
        )
    finally:
        cam.activations_and_grads.release()
    ours = gradcam(model, x, CLASSES)
    assert ours.shape == package.shape == (BATCH, NUM_CLASSES, 32, 32)
    assert int((package.amax(dim=(2, 3)) > 0.5).sum()) >= BATCH * NUM_CLASSES // 2
    assert (ours - package).abs().max().item() <= 1e-3


def test_gradcam_layer_of_any_cnn_is_its_last_conv_or_the_configured_path():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    assert gradcam_target_layer(model) is model[2]
    assert gradcam_target_layer(model, "0") is model[0]
    with pytest.raises(WysiwycError, match="evaluate.gradcam_layer=head: the classifier has no such module"):
        gradcam_target_layer(model, "head")
