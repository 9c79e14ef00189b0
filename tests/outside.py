"""Classifiers made "outside" wysiwyc, as a user's team would: torch and torchvision only, nothing of
``pipeline`` (this module must never import it), a normalisation that is not ImageNet's.

``save_all(folder, classes)`` writes one classifier in every form wysiwyc reads (a TorchScript file, a
torch.export program with a dynamic batch, a torchvision architecture's state dict) and the sidecar JSON of
each; the tests load each with ``explanandum.model`` and compare the logits with the module's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torchvision
from torch import nn

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # not ImageNet's


class TinyNet(nn.Module):
    """A small CNN with BatchNorm (its eval mode matters) and an average-pooled linear head."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def tiny(num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyNet(num_classes)
    with torch.no_grad():  # running statistics that differ from the defaults: eval and train modes differ
        model.features[1].running_mean.uniform_(-0.5, 0.5)
        model.features[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def sidecar(path: Path, classes: list[str], output: str, image_size: int | None = None) -> None:
    record = {"classes": classes, "output": output, "mean": list(MEAN), "std": list(STD)}
    if image_size:
        record["image_size"] = image_size
    path.with_suffix(".json").write_text(json.dumps(record))


def save_export(model: nn.Module, path: Path, size: int, dynamic: bool = True) -> Path:
    x = torch.zeros(2, 3, size, size)
    shapes = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic else None
    torch.export.save(torch.export.export(model.eval(), (x,), dynamic_shapes=shapes), str(path))
    return path


def save_torchscript(model: nn.Module, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.14: users still have such files
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path


def resnet18(num_classes: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).eval()
