"""Baseline attribution methods the Explainer is compared with.

Common signature: ``method(model, x, classes) -> maps (B, K, H, W)`` in [0, 1], one map per requested
class, at the input size. ``classes`` is either a list / 1-D tensor of K class indices (the same for
every image) or a (B, K) long tensor (per image). ``model`` maps images (B, 3, H, W) to logits (B, C)
and should be in eval mode (a frozen Explanandum); the methods do not change its mode or weights.

- Grad-CAM (Selvaraju et al.): own implementation with a forward hook on a target layer; one
  backward pass per requested class (``torch.autograd.grad``, no parameter gradients); map =
  relu(Σ_k mean(∂y_c/∂A_k)·A_k), bilinearly upsampled, then ``(map − min) / (max + 1e-7)`` per map as
  pytorch-grad-cam (used by the paper) does.
- RISE (Petsiuk et al.): N random binary grids (cells ``grid_size``², keep probability ``p``),
  bilinearly upsampled to (s+1)·cell and randomly shifted by < one cell; saliency_c = Σ_i p_c(x ⊙ M_i)·M_i
  / (N·p) with the model's **sigmoid** probabilities (multi-label classifiers); min-max normalised per
  map as the paper's script did. Paper defaults N = 8000, 7×7, p = 0.5.
- Constant masks 0 / 0.5 / 1 and the ideal (ground-truth) mask.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import WysiwycError


def class_index_tensor(classes, batch_size: int, device=None) -> torch.Tensor:
    """Normalise ``classes`` to a (B, K) long tensor."""
    t = torch.as_tensor(classes, dtype=torch.long, device=device)
    if t.dim() == 0:
        t = t.view(1)
    if t.dim() == 1:
        t = t.unsqueeze(0).expand(batch_size, -1)
    if t.dim() != 2 or t.shape[0] != batch_size:
        raise ValueError(
            f"classes must be K indices or a (B, K) tensor with B = {batch_size}, got shape {tuple(t.shape)}"
        )
    return t


# ---------------------------------------------------------------------------------------------------
# Grad-CAM


def gradcam_target_layer(model: nn.Module, path: str | None = None) -> nn.Module:
    """The layer Grad-CAM looks at: ``path`` (a module path, ``evaluate.gradcam_layer``), else the end of the
    last conv block.

    small_cnn ``blocks[-1]``; as the paper's ``src/evaluation/grad_cam.py`` (NN-Explainer): VGG
    ``features[-1]`` (its ``feature_extractor[-1]``, the last max-pooling) and ResNet ``layer4[-1]``
    (its ``feature_extractor[-2][-1]``, the last bottleneck, whose output is ``layer4``'s); a torchvision
    vision transformer: the first LayerNorm of its last encoder block (``encoder.layers[-1].ln_1``, the
    grad-cam package's choice for ViTs; :func:`vit_tokens_to_map` reshapes its tokens); any other model: its
    last ``Conv2d``.
    """
    if path:
        try:
            return model.get_submodule(path)
        except AttributeError:
            raise WysiwycError(
                f"evaluate.gradcam_layer={path}: the classifier has no such module; give a module path of it, "
                "e.g. layer4.1 or features.28 (print(model) lists them)"
            ) from None
    arch = getattr(model, "wysiwyc_arch", None)
    if arch == "small_cnn" or (arch is None and hasattr(model, "blocks")):
        return model.blocks[-1]
    if arch == "vgg16" or (arch is None and hasattr(model, "features") and isinstance(model.features, nn.Sequential)):
        return model.features[-1]
    if arch in ("resnet50", "resnet18") or (arch is None and hasattr(model, "layer4")):
        return model.layer4[-1]
    if _is_vit(model):
        return model.encoder.layers[-1].ln_1
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        return convs[-1]
    raise WysiwycError(
        f"gradcam: no convolution in {type(model).__name__} to look at; set evaluate.gradcam_layer to a module path"
    )


def _is_vit(model: nn.Module) -> bool:
    import torchvision

    return isinstance(model, torchvision.models.VisionTransformer)


def vit_tokens_to_map(tokens: torch.Tensor) -> torch.Tensor:
    """A ViT block's tokens (B, 1 + h·w, D) → a feature map (B, D, h, w): the class token dropped, the patch
    tokens laid out on their square grid (the grad-cam package's ``reshape_transform`` for ViTs)."""
    B, n, D = tokens.shape
    side = int(round((n - 1) ** 0.5))
    if side * side != n - 1:
        raise WysiwycError(f"gradcam: {n - 1} patch tokens do not form a square grid")
    return tokens[:, 1:, :].reshape(B, side, side, D).permute(0, 3, 1, 2)


def _normalise_gradcam(maps: torch.Tensor) -> torch.Tensor:
    """(map − min) / (max − min) per map (after the ReLU and the upsampling); an all-constant map is 0.

    Exact, as the paper's grad-cam 1.3.1; pytorch-grad-cam 1.5 divides by (max + 1e-7) before and after
    its resize, the same map up to ~1e-7 (upsampling is linear, so it commutes with the rescaling).
    """
    flat = maps.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    span = flat.amax(dim=2, keepdim=True) - lo
    out = torch.where(span > 0, (flat - lo) / span.clamp(min=torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return out.view_as(maps)


def gradcam(
    model: nn.Module, x: torch.Tensor, classes, target_layer: nn.Module | None = None, forward=None
) -> torch.Tensor:
    """Grad-CAM maps (B, K, H, W) in [0, 1] for the requested classes.

    ``forward`` (default ``model``) computes the logits from ``x`` (the classifier's own resizing, say);
    ``target_layer`` is a module of ``model`` (default :func:`gradcam_target_layer`). A torchvision ViT's
    tokens are laid out on their grid (:func:`vit_tokens_to_map`) before the weighting.
    """
    B, _, H, W = x.shape
    cls = class_index_tensor(classes, B, device=x.device)
    layer = target_layer if target_layer is not None else gradcam_target_layer(model)
    reshape = vit_tokens_to_map if _is_vit(model) else None
    forward = forward or model

    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda mod, inp, out: store.__setitem__("a", out))
    try:
        with torch.enable_grad():
            # the input carries the graph: a frozen model has no parameter that requires grad
            logits = forward(x.detach().requires_grad_(True))
            act = store["a"]  # (B, Ch, h, w); a ViT's (B, 1 + h·w, D)
            maps = []
            for k in range(cls.shape[1]):
                # images are independent in eval mode: the gradient of the sum is per image
                score = logits.gather(1, cls[:, k : k + 1]).sum()
                (grad,) = torch.autograd.grad(score, store["a"], retain_graph=k < cls.shape[1] - 1)
                if reshape is not None:
                    act, grad = reshape(store["a"]), reshape(grad)
                weights = grad.mean(dim=(2, 3), keepdim=True)  # α_k^c
                maps.append(F.relu((weights * act).sum(dim=1)).detach())  # relu(Σ_k α_k A_k)
    finally:
        handle.remove()
    cams = torch.stack(maps, dim=1)  # (B, K, h, w)
    cams = F.interpolate(cams, size=(H, W), mode="bilinear", align_corners=False)
    return _normalise_gradcam(cams)


# ---------------------------------------------------------------------------------------------------
# RISE


def rise_masks(num_masks: int, height: int, width: int, grid_size: int = 7, p: float = 0.5, seed: int = 0):
    """The RISE mask generator, built chunk by chunk so N × H × W never sits in memory at once.

    Returns a function ``make(start, stop, device) -> (n, H, W)`` giving masks ``start:stop``, the same
    ones on every call (grids and shifts are drawn once from ``seed``).
    """
    gen = torch.Generator().manual_seed(int(seed))
    grids = (torch.rand(num_masks, 1, grid_size, grid_size, generator=gen) < p).float()
    cell_h, cell_w = math.ceil(height / grid_size), math.ceil(width / grid_size)
    up = ((grid_size + 1) * cell_h, (grid_size + 1) * cell_w)
    shift_y = torch.randint(0, cell_h, (num_masks,), generator=gen)
    shift_x = torch.randint(0, cell_w, (num_masks,), generator=gen)

    def make(start: int, stop: int, device=None) -> torch.Tensor:
        g = grids[start:stop].to(device)
        big = F.interpolate(g, size=up, mode="bilinear", align_corners=False)[:, 0]  # (n, U_h, U_w)
        n = big.shape[0]
        rows = (shift_y[start:stop, None] + torch.arange(height)).to(device)  # (n, H)
        cols = (shift_x[start:stop, None] + torch.arange(width)).to(device)  # (n, W)
        idx = torch.arange(n, device=device)[:, None, None]
        return big[idx, rows[:, :, None], cols[:, None, :]]  # (n, H, W), crop at the shift

    return make


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp(min=1e-12)).clamp(0, 1).view_as(maps)


def rise(
    model: nn.Module,
    x: torch.Tensor,
    classes,
    num_masks: int = 8000,
    grid_size: int = 7,
    p: float = 0.5,
    seed: int = 0,
    batch_size: int = 64,
    probabilities: str = "sigmoid",
) -> torch.Tensor:
    """RISE maps (B, K, H, W) in [0, 1]: saliency_c = Σ_i p_c(x ⊙ M_i)·M_i / (N·p), min-max normalised.

    Args:
        num_masks: N (paper: 8000; a few hundred suffice for tests on CPU).
        grid_size: cells per side s (paper: 7).
        p: probability that a cell is kept (paper: 0.5).
        seed: masks are the same for every image and every call with the same seed.
        batch_size: masked images per forward pass.
        probabilities: ``sigmoid`` (multi-label) or ``softmax`` applied to the model's logits.
    """
    B, _, H, W = x.shape
    cls = class_index_tensor(classes, B, device=x.device)
    make = rise_masks(num_masks, H, W, grid_size=grid_size, p=p, seed=seed)
    to_prob: Callable[[torch.Tensor], torch.Tensor] = (
        torch.sigmoid if probabilities == "sigmoid" else functools.partial(torch.softmax, dim=1)
    )
    sal = torch.zeros(B, cls.shape[1], H, W, device=x.device)
    with torch.no_grad():
        for start in range(0, num_masks, batch_size):
            masks = make(start, min(start + batch_size, num_masks), device=x.device)  # (n, H, W)
            for b in range(B):
                probs = to_prob(model(x[b : b + 1] * masks.unsqueeze(1)))  # (n, C)
                sal[b] += torch.einsum("nk,nhw->khw", probs[:, cls[b]], masks)
    sal /= num_masks * p
    return _minmax(sal)


# ---------------------------------------------------------------------------------------------------
# Constant and ideal masks


def constant(value: float) -> Callable[..., torch.Tensor]:
    """A baseline that returns the constant ``value`` everywhere (the paper's 0 / 0.5 / 1 masks)."""

    def method(model, x: torch.Tensor, classes) -> torch.Tensor:
        cls = class_index_tensor(classes, x.shape[0])
        return torch.full((x.shape[0], cls.shape[1], *x.shape[-2:]), float(value), device=x.device)

    method.__name__ = f"constant_{value:g}"
    return method


def ideal(model, x: torch.Tensor, classes, *, seg: torch.Tensor) -> torch.Tensor:
    """The ground-truth mask of each requested class: seg == c + 1 (void and background are 0).

    Args:
        seg: class-index maps (B, H, W): 0 background, k+1 class k, 255 void.
    """
    cls = class_index_tensor(classes, x.shape[0], device=seg.device)
    return (seg.unsqueeze(1) == (cls + 1)[:, :, None, None]).float()


BASELINES: dict[str, Callable[..., torch.Tensor]] = {
    "gradcam": gradcam,
    "rise": rise,
    "zeros": constant(0.0),
    "half": constant(0.5),
    "ones": constant(1.0),
    "ideal": ideal,
}


def get_baseline(name: str, **options) -> Callable[..., torch.Tensor]:
    """The baseline ``name`` with its options bound (e.g. ``get_baseline("rise", num_masks=1000)``)."""
    if name not in BASELINES:
        raise WysiwycError(f"evaluate: unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
    method = BASELINES[name]
    return functools.partial(method, **options) if options else method
