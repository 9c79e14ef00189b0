"""Explainers: segmentation nets giving per-class mask logits S = E(x) of shape (B, C, H, W).

Architectures (``arch``):

- ``deeplabv3_resnet50``: the paper's Explainer, torchvision DeepLabv3-ResNet50 without the aux head,
  C outputs, upsampled to the input size. The ResNet-50 backbone starts from a torchvision ImageNet
  state dict given as a file (``explainer.init=backbone_file``; the paper's backbone was
  ImageNet-pretrained).
- ``deeplabv3_mobilenet_v3_large``: the same with a MobileNetV3-Large backbone (about 7× cheaper).
- ``compact``: a small U-Net for CPUs that decodes at **full input resolution** (half-resolution
  logits gave blobby masks that spill between neighbouring objects). Its encoder is a stack of
  conv blocks with :data:`COMPACT_CHANNELS` (the Explainer's own choice, read from no classifier);
  ``levels`` (2..4) uses only the first blocks (the CPU presets use 3: 22% fewer multiply-adds; the
  settings tried are in the README's "Benchmarks" section). With ``cam=True`` a class-activation
  branch adds per-position class evidence to the logits: the encoder's remaining blocks and a 1×1
  conv (a linear layer applied at every position), upsampled. :meth:`CompactExplainer.class_logits`
  reads that branch as a classifier (maximum over positions), which is what
  ``explainer.init=distilled`` trains to reproduce the Explanandum's outputs before the paper's loss,
  so that the masks are class-specific from the first step of it.

How the weights start (``explainer.init``, recorded in every checkpoint with ``black_box``):
``scratch`` (random), ``distilled`` (random, then distilled from the Explanandum's outputs by the
trainer), ``backbone_file`` (DeepLab: an ImageNet backbone file) — all black-box: nothing of the
Explanandum but its outputs is used — and the white-box variant ``explanandum_copy`` (compact: the
encoder and branch copied from a ``small_cnn`` Explanandum's conv blocks and linear layer, i.e. its
own class-activation map; ``encoder_from=``), never the product's default.

Every Explainer's ``forward`` returns a plain logits tensor (B, C, H, W) at the input's H × W.

Training note: torchvision's DeepLab heads contain a BatchNorm after global pooling, so in train mode
they need a batch of at least 2 images.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import BACKBONE_OF, backbone_howto
from pipeline.errors import WysiwycError
from pipeline.models.blocks import conv_block, encode_blocks
from pipeline.models.explanandum import (
    SmallCNN,
    StateSource,
    check_arch,
    load_weights,
    read_state_dict,
)

ARCHS = ("deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large", "compact", "resunet", "resunet_os4", "mobileunet")
COMPACT_CHANNELS = (32, 64, 128, 128)  # the compact encoder's blocks (a VGG-style stack of its own)


class TorchvisionSegmentationExplainer(nn.Module):
    """A torchvision segmentation model whose forward returns the ``out`` logits as a plain tensor."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]  # torchvision already upsamples to the input size


def _unet_forward(net: nn.Module, skips: list[torch.Tensor]) -> torch.Tensor:
    """The decoder of a U-Net Explainer over its encoder's outputs (highest resolution first): at each level,
    bilinear upsampling to the skip's size, concatenation, ``net.decoder[j]``; ``net.head`` at full resolution,
    plus the class branch's logits (``net._cam`` of the deepest level) upsampled when there is one."""
    z = deepest = skips.pop()
    for dec in net.decoder:
        skip = skips.pop()
        z = F.interpolate(z, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        z = dec(torch.cat([z, skip], dim=1))
    out = net.head(z)
    if net.cam_channels is not None:
        out = out + F.interpolate(net._cam(deepest), size=out.shape[-2:], mode="bilinear", align_corners=False)
    return out


class CompactExplainer(nn.Module):
    """U-Net-like Explainer: a conv-block encoder, a decoder back to the full input resolution.

    Encoder: ``blocks[i]`` (conv-BN-ReLU ×2) at 1/2^i resolution, max-pooling between blocks (the
    layout of ``SmallCNN``, so the white-box ``explanandum_copy`` init can load one into the other).
    Decoder: at each level, bilinear upsampling to the skip's size, concatenation with the skip,
    conv-BN-ReLU ×2 to ``decoder_channels`` (default: half the encoder's channels at that level, which
    cost 64% of the multiply-adds of a full-width decoder's at 48 px and trained to the same IoU,
    README "Benchmarks"); a 1×1 conv gives C logits at full resolution. Any H × W works.

    ``cam_channels`` (None: no branch) adds the class-activation branch: conv blocks with these output
    channels continue the encoder past its deepest level (max-pooling between), a 1×1 conv maps their
    output to C logits per position, which are upsampled bilinearly and added to the head's. ``()``
    applies the 1×1 conv to the deepest level directly.
    """

    def __init__(
        self,
        num_classes: int,
        channels: tuple[int, ...] = COMPACT_CHANNELS,
        in_channels: int = 3,
        cam_channels: tuple[int, ...] | None = None,
        decoder_channels: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        self.cam_channels = None if cam_channels is None else tuple(int(c) for c in cam_channels)
        # decoder_channels[i]: what the decoder outputs at level i (0 = full resolution … n-2)
        self.decoder_channels = (
            tuple(int(c) for c in decoder_channels)
            if decoder_channels is not None
            else tuple(c // 2 for c in self.channels[:-1])
        )
        ins = (in_channels,) + self.channels[:-1]
        self.blocks = nn.ModuleList(conv_block(i, o) for i, o in zip(ins, self.channels))
        self.pool = nn.MaxPool2d(2)
        # decoder[j] merges level (n-1-j) upsampled with skip level (n-2-j)
        n = len(self.channels)
        below = (self.channels[-1],) + tuple(reversed(self.decoder_channels[1:]))  # what arrives from below
        self.decoder = nn.ModuleList(
            conv_block(up + self.channels[i], self.decoder_channels[i]) for up, i in zip(below, reversed(range(n - 1)))
        )
        self.head = nn.Conv2d(self.decoder_channels[0], num_classes, kernel_size=1)
        if self.cam_channels is not None:
            ins = (self.channels[-1],) + self.cam_channels[:-1]
            self.cam_blocks = nn.ModuleList(conv_block(i, o) for i, o in zip(ins, self.cam_channels))
            self.cam_fc = nn.Conv2d((self.channels + self.cam_channels)[-1], num_classes, kernel_size=1)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        return encode_blocks(self.blocks, self.pool, x)

    def _cam_features(self, deepest: torch.Tensor) -> torch.Tensor:
        for block in self.cam_blocks:
            deepest = block(self.pool(deepest))
        return deepest

    def _cam(self, deepest: torch.Tensor) -> torch.Tensor:
        """The branch's class logits per position (B, C, h, w) from the deepest encoder level."""
        return self.cam_fc(self._cam_features(deepest))  # a linear layer at every position

    def forward(self, x: torch.Tensor, classify: bool = False) -> torch.Tensor:
        """Per-class mask logits (B, C, H, W); with ``classify``, :meth:`class_logits` instead (a flag of
        ``forward`` rather than a method of its own so that a DDP-wrapped Explainer can distil)."""
        if classify:
            return self.class_logits(x)
        return _unet_forward(self, self._encode(x))

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder and class-activation branch as a classifier (B, C): the branch's features
        max-pooled over positions, then its linear layer, so that the same linear layer applied at
        every position is this classifier's class-activation map. (The maximum of the per-position
        logits instead learned nothing in 1,000 distillation steps at 48 px; this order broke the
        plateau after ~400, README "Benchmarks".) The decoder is not used."""
        if self.cam_channels is None:
            raise WysiwycError("explainer: class_logits needs the class-activation branch (explainer.cam=true)")
        pooled = self._cam_features(self._encode(x)[-1]).amax(dim=(-2, -1), keepdim=True)
        return self.cam_fc(pooled).flatten(1)

    def load_encoder_from(self, classifier: nn.Module) -> None:
        """White-box init (``explanandum_copy``): copy the first conv blocks of a ``small_cnn``
        Explanandum (as many as this encoder has levels) into this encoder, and the rest of its blocks
        and its linear layer into the class-activation branch when there is one (values only: the
        copies learn even when the classifier is frozen)."""
        blocks = getattr(classifier, "blocks", None)
        if not isinstance(classifier, SmallCNN) or blocks is None:
            raise WysiwycError(
                "explainer: explainer.init=explanandum_copy needs a small_cnn Explanandum, got "
                f"{type(classifier).__name__}"
            )
        n = len(self.channels)
        own_channels = self.channels + (self.cam_channels or ())
        if tuple(classifier.channels[: len(own_channels)]) != own_channels or (
            self.cam_channels is not None and tuple(classifier.channels) != own_channels
        ):
            raise WysiwycError(
                f"explainer: the Explanandum has channels {classifier.channels}, the compact Explainer {own_channels}"
            )
        for own, theirs in zip(self.blocks, blocks):
            own.load_state_dict(theirs.state_dict())
        if self.cam_channels is not None:
            for own, theirs in zip(self.cam_blocks, list(blocks)[n:]):
                own.load_state_dict(theirs.state_dict())
            with torch.no_grad():
                self.cam_fc.weight.copy_(classifier.fc.weight[:, :, None, None])
                self.cam_fc.bias.copy_(classifier.fc.bias)


class ResidualBlock(nn.Module):
    """ResNet's basic block: conv3×3(stride, dilation)-BN-ReLU-conv3×3-BN plus the input (a strided 1×1
    conv-BN where the shape changes), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def _inverted_residual(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Module:
    """torchvision's MobileNetV2 block with expansion 4 (1×1 expansion, depthwise 3×3, 1×1 projection, the input
    added where the shape is kept); it takes no dilation."""
    from torchvision.models.mobilenetv2 import InvertedResidual

    if dilation != 1:
        raise ValueError("the inverted-residual block takes no dilation")
    return InvertedResidual(in_channels, out_channels, stride, expand_ratio=4)


UNET_DESIGNS: dict[str, dict] = {
    # arch: the block, the encoder's channels per level (each level after the first halves the resolution with
    # a strided block), the class branch's channels and whether it keeps the deepest level's resolution
    # (dilated) instead of halving it again
    "resunet": {"block": "residual", "channels": (24, 48, 96), "cam_channels": 192, "dilated": False},
    "resunet_os4": {"block": "residual", "channels": (24, 48, 96), "cam_channels": 192, "dilated": True},
    "mobileunet": {"block": "inverted", "channels": (16, 32, 64), "cam_channels": 128, "dilated": False},
}


class UNetExplainer(nn.Module):
    """A U-Net Explainer of its own design (the F-independent default; ``arch`` one of :data:`UNET_DESIGNS`).

    Encoder: a 3×3 stem and one block per level, each level after the first halving the resolution with a
    strided block (no max pooling). Decoder: bilinear upsampling to the skip's size, concatenation, one block
    to half the level's channels, back to the full input resolution; a 1×1 conv gives C mask logits. With
    ``cam``, a class branch continues the encoder by one block (strided, or dilated at the same resolution),
    and a linear layer on the concatenation of its features' spatial mean and maximum gives the class
    logits (:meth:`class_logits`, what ``explainer.init=distilled`` fits to F's outputs); the same linear
    layer applied at every position (its mean and max halves summed) is added, upsampled, to the mask logits.
    """

    def __init__(self, num_classes: int, design: str, cam: bool = False):
        super().__init__()
        spec = UNET_DESIGNS[design]
        block = ResidualBlock if spec["block"] == "residual" else _inverted_residual
        channels = spec["channels"]
        self.design = design
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels[0], 3, padding=1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True)
        )
        ins = (channels[0],) + channels[:-1]
        self.encoder = nn.ModuleList(
            block(i, o, stride=1 if k == 0 else 2) for k, (i, o) in enumerate(zip(ins, channels))
        )
        below = (channels[-1],) + tuple(c // 2 for c in channels[1:-1][::-1])
        self.decoder = nn.ModuleList(
            block(up + channels[i], channels[i] // 2) for up, i in zip(below, reversed(range(len(channels) - 1)))
        )
        self.head = nn.Conv2d(channels[0] // 2, num_classes, 1)
        self.cam_channels = (spec["cam_channels"],) if cam else None
        if cam:
            c = spec["cam_channels"]
            self.cam_block = block(channels[-1], c, dilation=2) if spec["dilated"] else block(channels[-1], c, stride=2)
            self.cam_fc = nn.Linear(2 * c, num_classes)

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for block in self.encoder:
            x = block(x)
            feats.append(x)
        return feats

    def _cam(self, deepest: torch.Tensor) -> torch.Tensor:
        """The class branch's logits per position (B, C, h, w)."""
        z = self.cam_block(deepest)
        c = z.shape[1]
        weight = (self.cam_fc.weight[:, :c] + self.cam_fc.weight[:, c:])[:, :, None, None]
        return F.conv2d(z, weight, self.cam_fc.bias)

    def forward(self, x: torch.Tensor, classify: bool = False) -> torch.Tensor:
        """Per-class mask logits (B, C, H, W); with ``classify``, :meth:`class_logits` instead."""
        if classify:
            return self.class_logits(x)
        return _unet_forward(self, self._encode(x))

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder and class branch as a classifier (B, C): the linear layer on [mean, max] of the branch's
        features over positions. The decoder is not used."""
        if self.cam_channels is None:
            raise WysiwycError("explainer: class_logits needs the class-activation branch (explainer.cam=true)")
        z = self.cam_block(self._encode(x)[-1])
        return self.cam_fc(torch.cat([z.mean(dim=(-2, -1)), z.amax(dim=(-2, -1))], dim=1))


def build_explainer(
    arch: str,
    num_classes: int,
    backbone_weights: StateSource | None = None,
    encoder_from: nn.Module | None = None,
    weights: StateSource | None = None,
    levels: int | None = None,
    cam: bool = False,
) -> nn.Module:
    """Build an Explainer whose forward maps (B, 3, H, W) to per-class logits (B, C, H, W).

    Args:
        arch: ``deeplabv3_resnet50``, ``deeplabv3_mobilenet_v3_large`` or ``compact``.
        num_classes: C, one mask per class of the Explanandum.
        backbone_weights: for the DeepLab archs, a torchvision ImageNet state dict of the backbone
            (``resnet50`` / ``mobilenet_v3_large``) as a path/URL, bytes, mapping or loader callable.
        encoder_from: for ``compact``, the white-box ``explanandum_copy`` init: a ``small_cnn``
            Explanandum whose conv blocks (and linear layer, with ``cam``) start the Explainer.
            None (black-box): random weights, :data:`COMPACT_CHANNELS`.
        weights: the whole Explainer's state dict (a trained checkpoint), same forms as above; a
            ``compact`` Explainer takes its channels and levels from it.
        levels: for ``compact``, how many of the encoder's blocks the U-Net uses (default: all).
            Fewer levels, a smaller receptive field and a cheaper net.
        cam: for ``compact``, add the class-activation branch (the encoder's remaining blocks and a
            per-position linear layer).

    Raises:
        WysiwycError: unknown arch, an option the arch does not take, or weights that do not fit.
    """
    arch = check_arch("explainer", arch, ARCHS, num_classes)

    if arch == "compact":
        if backbone_weights is not None:
            raise WysiwycError(
                "explainer.backbone_weights: the compact Explainer has no ImageNet backbone; "
                "use explainer.init=scratch or distilled"
            )
        decoder_channels = None  # the default width, unless a checkpoint has its own
        if weights is not None:
            weights = read_state_dict(weights, what="explainer weights (compact)")
            channels, cam_channels, decoder_channels = _compact_channels(weights)
        else:
            channels = tuple(encoder_from.channels) if isinstance(encoder_from, SmallCNN) else COMPACT_CHANNELS
            cam_channels = None
        n = len(channels) if levels is None else int(levels)
        if not 2 <= n <= len(channels):
            raise WysiwycError(f"explainer.levels={levels}: the compact encoder has 2..{len(channels)} levels")
        if weights is None and cam:  # the branch continues with the blocks the U-Net does not use
            cam_channels = channels[n:]
        channels = channels[:n]
        model: nn.Module = CompactExplainer(
            num_classes, channels=channels, cam_channels=cam_channels, decoder_channels=decoder_channels
        )
        if encoder_from is not None:
            model.load_encoder_from(encoder_from)
    elif arch in UNET_DESIGNS:
        if backbone_weights is not None or encoder_from is not None or levels is not None:
            raise WysiwycError(
                f"explainer: the {arch} Explainer takes neither backbone weights, explanandum_copy nor levels"
            )
        if weights is not None:
            weights = read_state_dict(weights, what=f"explainer weights ({arch})")
            cam = "cam_fc.weight" in weights
        model = UNetExplainer(num_classes, arch, cam=cam)
    else:
        if encoder_from is not None:
            raise WysiwycError(
                f"explainer: explainer.init=explanandum_copy is only for the compact Explainer, not {arch}"
            )
        if cam:
            raise WysiwycError(f"explainer.cam is only for the compact Explainer, not {arch}")
        model = _build_deeplab(arch, num_classes, backbone_weights)
    model.wysiwyc_arch = arch

    if weights is not None:
        load_weights(model, weights, "explainer", num_classes)
    return model


def _compact_channels(
    state: Mapping[str, torch.Tensor],
) -> tuple[tuple[int, ...], tuple[int, ...] | None, tuple[int, ...] | None]:
    """(encoder channels, class-activation branch channels or None, decoder channels per level or None)
    of a compact Explainer's state dict (``blocks.i.0.weight`` / ``cam_blocks.i.0.weight`` /
    ``decoder.j.0.weight`` are (c, ...); decoder j outputs level n-2-j; checkpoints written before the
    decoder's default width changed keep the full width they were trained with)."""

    def out_channels(prefix: str) -> tuple[int, ...]:
        found = []
        while f"{prefix}.{len(found)}.0.weight" in state:
            found.append(int(state[f"{prefix}.{len(found)}.0.weight"].shape[0]))
        return tuple(found)

    cam = out_channels("cam_blocks") if "cam_fc.weight" in state else None
    decoder = tuple(reversed(out_channels("decoder"))) or None
    return out_channels("blocks") or COMPACT_CHANNELS, cam, decoder  # not a compact state dict: load_weights names it


def _build_deeplab(arch: str, num_classes: int, backbone_weights: StateSource | None) -> nn.Module:
    from torchvision.models import segmentation

    # weights=None and weights_backbone=None: torchvision must never download anything here
    net = getattr(segmentation, arch)(weights=None, weights_backbone=None, aux_loss=False, num_classes=num_classes)
    if backbone_weights is not None:
        net_name = BACKBONE_OF[arch]
        howto = backbone_howto(net_name, "explainer.backbone_weights")
        if (
            backbone_weights is True
            or isinstance(backbone_weights, str)
            and backbone_weights in ("imagenet", "torchvision", "")
        ):
            raise WysiwycError(
                f"explainer: ImageNet weights for the {net_name} backbone were asked for without a file; {howto}"
            )
        state = read_state_dict(backbone_weights, what=f"explainer.backbone_weights ({net_name})", howto=howto)
        _load_backbone(net.backbone, net_name, state, howto)
    return TorchvisionSegmentationExplainer(net)


def _load_backbone(backbone: nn.Module, net_name: str, state: Mapping[str, torch.Tensor], howto: str) -> None:
    """Load a torchvision classification state dict into DeepLab's IntermediateLayerGetter backbone."""
    if net_name == "resnet50":
        wanted = {k: v for k, v in state.items() if not k.startswith("fc.")}
    else:  # mobilenet_v3_large: the backbone is ``features`` (keys "features.N..." → "N...")
        wanted = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    own = backbone.state_dict()
    missing = [k for k in own if k not in wanted]
    unexpected = [k for k in wanted if k not in own]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise WysiwycError(f"explainer.backbone_weights: not a torchvision {net_name} state dict ({detail}); {howto}")
    try:
        backbone.load_state_dict(wanted)
    except RuntimeError as e:  # shapes differ
        raise WysiwycError(
            f"explainer.backbone_weights: not a torchvision {net_name} state dict "
            f"({str(e).splitlines()[0][:300]}); {howto}"
        ) from e
