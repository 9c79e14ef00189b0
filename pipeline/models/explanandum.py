"""Explananda: the frozen image classifiers whose decisions an Explainer explains.

Architectures (``arch``):

- ``vgg16``: torchvision VGG-16; the convolutional ``features`` are frozen, the head is new
  (25088 → 4096 → 4096 → C with ReLU + Dropout, as the paper's ``VGG16ClassifierModel``), after
  torchvision's adaptive 7×7 average pooling.
- ``resnet50`` / ``resnet18``: torchvision ResNet, frozen except a new last ``fc`` (C outputs).
- ``small_cnn``: a CPU-sized VGG-style CNN (4 blocks of conv-BN-ReLU ×2, max-pooling between blocks,
  32-64-128-128 channels) with **global max pooling** and a linear head. Its ``blocks`` are the
  encoder a ``compact`` Explainer can start from (see ``pipeline.models.explainer``).

Weights never come from the network: ImageNet backbones are read from a torchvision state dict that
the user provides as a file (local path, ``file://`` or any URL ``pipeline.storage`` can open, such as
``s3://``), as bytes, or through a loader callable.

Frozen backbones (and a whole Explanandum after :func:`freeze_explanandum`) are *locked* in eval mode:
their ``train`` method is replaced on the instance so that a parent's ``.train()`` cannot switch
BatchNorm or Dropout back on (the paper's code had Lightning silently do that).
"""

from __future__ import annotations

import functools
import io
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import storage  # the URL layer (s3://…)
from pipeline.config import backbone_howto
from pipeline.errors import WysiwycError, first_line
from pipeline.models.blocks import conv_block, encode_blocks

ARCHS = ("vgg16", "resnet50", "resnet18", "small_cnn")
SMALL_CNN_CHANNELS = (32, 64, 128, 128)

# A state dict given directly, as a path/URL, as the bytes of a torch.save file, or by a loader callable
StateSource = str | os.PathLike | bytes | Mapping | Callable[[], Any]

# Values of ``pretrained_backbone`` that ask for ImageNet weights without saying where the file is
_PRETRAINED_WITHOUT_FILE = (True, "imagenet", "torchvision", "pretrained", "default", "")


# ---------------------------------------------------------------------------------------------------
# The CPU-sized classifier


class SmallCNN(nn.Module):
    """VGG-style CNN with global max pooling (average pooling failed to learn at CPU size).

    ``blocks[i]`` works at 1/2^i of the input resolution (2×2 max-pooling between blocks). The
    pooling after the last block of a classic VGG is left out: the global max pool that follows
    subsumes it, and the last block's output keeps twice the resolution for Grad-CAM.

    Args:
        num_classes: C, the number of logits.
        channels: output channels of the blocks.
        in_channels: input channels (3 for RGB).
    """

    def __init__(self, num_classes: int, channels: tuple[int, ...] = SMALL_CNN_CHANNELS, in_channels: int = 3):
        super().__init__()
        self.channels = tuple(int(c) for c in channels)
        ins = (in_channels,) + self.channels[:-1]
        self.blocks = nn.ModuleList(conv_block(i, o) for i, o in zip(ins, self.channels))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(self.channels[-1], num_classes)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every block, highest resolution first (the skips of a U-Net decoder)."""
        return encode_blocks(self.blocks, self.pool, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x)[-1]
        z = z.amax(dim=(2, 3))  # global max pooling
        return self.fc(z)


# ---------------------------------------------------------------------------------------------------
# Building


def build_explanandum(
    arch: str,
    num_classes: int,
    weights: StateSource | None = None,
    pretrained_backbone: StateSource | bool | None = None,
) -> nn.Module:
    """Build an Explanandum (classifier) of the given architecture.

    Args:
        arch: one of ``vgg16``, ``resnet50``, ``resnet18``, ``small_cnn``.
        num_classes: C, the number of logits.
        weights: the whole Explanandum's state dict (a fine-tuned classifier checkpoint): a path or
            URL, bytes, a mapping, or a callable returning one of those or a binary file. A checkpoint
            dict holding the state dict under ``model`` or ``state_dict`` is accepted too.
        pretrained_backbone: a torchvision ImageNet state dict of the backbone (``vgg16``,
            ``resnet50`` or ``resnet18`` as torchvision saves it), same forms as ``weights``. Only the
            backbone is taken from it (VGG ``features``; everything but ResNet ``fc``). ``True`` or
            ``"imagenet"`` without a file raises :class:`WysiwycError` saying how to provide one.

    Returns:
        The model, with ``wysiwyc_arch`` set to ``arch``. For ``vgg16``/``resnet*`` the backbone has
        ``requires_grad=False`` and is locked in eval mode; the head is trainable.

    Raises:
        WysiwycError: unknown arch, pretrained weights asked for without a file, unreadable file or
            a state dict that does not fit the architecture.
    """
    arch = check_arch("explanandum", arch, ARCHS, num_classes)

    if arch == "small_cnn":
        if pretrained_backbone is not None and pretrained_backbone is not False:
            raise WysiwycError(
                "explanandum.pretrained_backbone: small_cnn has no ImageNet backbone; leave it unset "
                "(train the classifier from scratch) or pick vgg16/resnet50/resnet18"
            )
        model: nn.Module = SmallCNN(num_classes)
    else:
        model = _build_torchvision(arch, num_classes, pretrained_backbone)
    model.wysiwyc_arch = arch

    if weights is not None:
        load_weights(model, weights, "explanandum", num_classes)
    return model


def check_arch(role: str, arch: str, archs: tuple[str, ...], num_classes: int) -> str:
    """The lower-cased ``arch`` if it is one of ``archs`` and there is at least one class, else a clear error."""
    arch = str(arch).lower()
    if arch not in archs:
        raise WysiwycError(f"{role}.arch: unknown architecture {arch!r}; choose one of {', '.join(archs)}")
    if num_classes < 1:
        raise WysiwycError(f"{role}: num_classes must be at least 1, got {num_classes}")
    return arch


def load_weights(model: nn.Module, weights: StateSource, role: str, num_classes: int, key: str = "checkpoint") -> None:
    """Load a whole trained model's state dict; a mismatch names ``{role}.{key}`` and the arch."""
    arch = getattr(model, "wysiwyc_arch", type(model).__name__)
    state = read_state_dict(weights, what=f"{role}.{key} ({arch})")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise WysiwycError(
            f"{role}.{key}: the state dict does not fit a {arch} with {num_classes} classes "
            f"({first_line(e)}); check {role}.arch and the class list"
        ) from e


def _build_torchvision(arch: str, num_classes: int, pretrained_backbone: StateSource | bool | None) -> nn.Module:
    import torchvision

    if pretrained_backbone is False:
        pretrained_backbone = None
    if pretrained_backbone is not None and any(
        pretrained_backbone is v or (isinstance(pretrained_backbone, str) and pretrained_backbone == v)
        for v in _PRETRAINED_WITHOUT_FILE
    ):
        raise WysiwycError(
            f"explanandum: ImageNet weights for {arch} were asked for without a file; " + backbone_howto(arch)
        )

    # weights=None: torchvision must never download anything here
    if arch == "vgg16":
        model = torchvision.models.vgg16(weights=None)
        # the paper's new head: 25088 → 4096 → 4096 → C (default PyTorch init)
        model.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, num_classes),
        )
        backbone = [model.features, model.avgpool]
    else:
        model = getattr(torchvision.models, arch)(weights=None)
        model.fc = nn.Linear(model.fc.in_features, num_classes)  # the new last layer
        backbone = [m for name, m in model.named_children() if name != "fc"]

    if pretrained_backbone is not None:
        state = read_state_dict(
            pretrained_backbone, what=f"explanandum.pretrained_backbone ({arch})", howto=backbone_howto(arch)
        )
        _load_backbone(model, arch, state)

    # the paper's scheme: the backbone is frozen, only the new head learns
    for module in backbone:
        module.requires_grad_(False)
        lock_eval(module)
    return model


def _load_backbone(model: nn.Module, arch: str, state: Mapping[str, torch.Tensor]) -> None:
    """Copy the ImageNet backbone from a torchvision state dict into ``model`` (head left as built)."""
    head = "classifier." if arch == "vgg16" else "fc."
    backbone_state = {k: v for k, v in state.items() if not k.startswith(head)}
    try:
        result = model.load_state_dict(backbone_state, strict=False)
    except RuntimeError as e:  # shapes differ
        raise WysiwycError(
            f"explanandum.pretrained_backbone: not a torchvision {arch} state dict ({first_line(e)}); "
            + backbone_howto(arch)
        ) from e
    missing = [k for k in result.missing_keys if not k.startswith(head)]
    if missing or result.unexpected_keys:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {list(result.unexpected_keys)[:3]}"
        raise WysiwycError(
            f"explanandum.pretrained_backbone: not a torchvision {arch} state dict ({detail}); " + backbone_howto(arch)
        )


# ---------------------------------------------------------------------------------------------------
# Freezing


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``module.train``: a locked module ignores the request and stays in eval mode."""
    return module


def lock_eval(module: nn.Module) -> nn.Module:
    """Put ``module`` and all its submodules in eval mode and keep them there.

    ``train`` is replaced on every submodule instance (a ``functools.partial``, so the model still
    pickles and deep-copies), so that neither a parent's ``.train()`` nor ``.train()`` called on any
    submodule turns Dropout or BatchNorm updates back on.
    """
    module.eval()
    for m in module.modules():
        m.train = functools.partial(_stay_in_eval, m)
    return module


def is_eval_locked(module: nn.Module) -> bool:
    """Whether every submodule of ``module`` is locked in eval mode by :func:`lock_eval`."""
    return all(isinstance(m.__dict__.get("train"), functools.partial) and not m.training for m in module.modules())


def freeze_explanandum(model: nn.Module) -> nn.Module:
    """Freeze an Explanandum for Explainer training: no parameter learns and it stays in eval mode.

    Gradients still flow *through* the model (to the mask); only its own parameters get none. The
    lock is permanent for this instance; build a new model to fine-tune it again.
    """
    model.requires_grad_(False)
    lock_eval(model)
    return model


class BlackBox:
    """The Explanandum F as a function only, the access the paper's method has: calling it returns F's
    logits (and gradients flow through it to the input); reading anything else of it — weights, layers,
    modules, attributes — raises, so nothing built or trained with it can depend on more than F's
    outputs and the gradients through them."""

    __slots__ = ("_f",)

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor]):
        object.__setattr__(self, "_f", model)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return object.__getattribute__(self, "_f")(x)

    def __getattribute__(self, name: str):
        raise WysiwycError(f"the Explanandum is a black box here: only calling it is allowed, not .{name}")

    def __setattr__(self, name: str, value) -> None:
        raise WysiwycError(f"the Explanandum is a black box here: only calling it is allowed, not setting .{name}")


def classifier_trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a classifier fine-tune trains: the new head for vgg16/resnet*, all for small_cnn."""
    arch = getattr(model, "wysiwyc_arch", None)
    if arch == "vgg16":
        params: Iterator[nn.Parameter] = model.classifier.parameters()
    elif arch in ("resnet50", "resnet18"):
        params = model.fc.parameters()
    elif arch == "small_cnn":
        params = model.parameters()
    else:
        raise WysiwycError(
            "classifier_trainable_parameters: the model was not built by build_explanandum (no wysiwyc_arch)"
        )
    return list(params)


# ---------------------------------------------------------------------------------------------------
# Reading state dicts (shared with pipeline.models.explainer)


def read_state_dict(source: StateSource, what: str = "weights", howto: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a mapping, bytes, a path/URL or a loader callable.

    Local paths and ``file://`` URLs are opened directly; other URLs (``s3://``…) through
    ``pipeline.storage.open_read``. Files are loaded with ``torch.load(weights_only=True)`` on the CPU.
    A checkpoint dict holding the state dict under ``model`` or ``state_dict`` is unwrapped.

    Raises:
        WysiwycError: the file is missing or unreadable, or holds no state dict.
    """
    obj: Any = source
    if callable(obj) and not isinstance(obj, Mapping):
        obj = obj()
    if isinstance(obj, Mapping):
        state = obj
    else:
        try:
            state = torch.load(_open_binary(obj, what, howto), map_location="cpu", weights_only=True)
        except WysiwycError:
            raise
        except Exception as e:  # noqa: BLE001 - any unpickling problem means "not a usable file"
            raise WysiwycError(
                f"{what}: cannot load {_describe(source)} as a torch state dict ({first_line(e)})"
            ) from e
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WysiwycError(f"{what}: {_describe(source)} does not hold a state dict of tensors")
    return dict(state)


def _open_binary(obj: Any, what: str, howto: str | None) -> io.IOBase:
    """A readable binary file for bytes, a file object or a path/URL."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(obj))
    if hasattr(obj, "read"):
        return obj
    if not isinstance(obj, (str, os.PathLike)):
        raise WysiwycError(f"{what}: expected a path, URL, bytes or a loader callable, got {type(obj).__name__}")
    url = os.fspath(obj)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        try:
            f = storage.open_read(url)
            try:
                return io.BytesIO(f.read())
            finally:
                close = getattr(f, "close", None)
                if close is not None:
                    close()
        except WysiwycError:
            raise
        except Exception as e:  # noqa: BLE001
            raise WysiwycError(f"{what}: cannot read {url} ({first_line(e)})" + (f"; {howto}" if howto else "")) from e
    path = Path(url).expanduser()
    if not path.is_file():
        raise WysiwycError(f"{what}: file not found: {path}" + (f"; {howto}" if howto else ""))
    return io.BytesIO(path.read_bytes())


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"the given {type(source).__name__}"
