"""Train a classifier "outside" wysiwyc, as a user's team would: torch, torchvision and PIL only, nothing of
``pipeline`` (this script must never import it), its own normalisation (not ImageNet's).

Reads WebDataset shards as plain tar files (``NAME.png`` + ``NAME.json`` with ``labels``, the classes in the
split's ``SPLIT.manifest.json``), trains a torchvision architecture from scratch, multi-label (sigmoid, BCE) or
single-label (softmax, cross-entropy; on the images that show one object), and writes what wysiwyc reads:

- ``OUT/NAME.pth``: the state dict (``explanandum.arch=torchvision:ARCH explanandum.weights=OUT/NAME.pth``),
- ``OUT/NAME_script.pt``: TorchScript of the same weights,
- ``OUT/NAME.pt2``: a ``torch.export`` program with a dynamic batch,
- a sidecar ``.json`` beside each (classes, output, mean, std),
- ``OUT/unlabelled/*.png``: the training images without their labels (for ``wysiwyc ingest images``).

    python tests/bench/outside_classifier.py --train DATA/train --val DATA/val --arch resnet18 --out OUT

It prints the validation micro-F1 (multi-label) or accuracy (single-label) per epoch.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def read_split(prefix: str) -> tuple[list[str], list[np.ndarray], list[list[int]]]:
    """(classes, images as uint8 HWC arrays, label lists) of a split written by ``wysiwyc ingest``."""
    folder, split = Path(prefix).parent, Path(prefix).name
    manifest = json.loads((folder / f"{split}.manifest.json").read_text())
    images, labels = [], []
    for shard in manifest["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".json")):
                key = name[: -len(".json")]
                meta = json.loads(tar.extractfile(members[name]).read())
                image = next(members[key + ext] for ext in (".png", ".jpg") if key + ext in members)
                images.append(np.asarray(Image.open(io.BytesIO(tar.extractfile(image).read())).convert("RGB")))
                labels.append(list(meta["labels"]))
    return manifest["classes"], images, labels


def tensors(images: list[np.ndarray], labels: list[list[int]], classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    y = torch.zeros(len(labels), classes)
    for i, ls in enumerate(labels):
        y[i, ls] = 1.0
    return x, y


class TokenMaxViT(nn.Module):
    """A CPU-sized hybrid vision transformer (ViT-Hybrid, Dosovitskiy et al. 2021: convolutions make the patch
    embeddings): torchvision's ``VisionTransformer`` with a convolutional stem of four 3×3 conv-BN-ReLU layers
    (strides 1, 2, 1, 2: 4-px patches, a 12 × 12 token grid at 48 px), 4 encoder blocks, the class read from the
    maximum over the patch tokens. Measured on the hard synthetic set (small objects in clutter), torchvision's
    class-token ViT stayed at chance (loss ln 6) with its patchify stem (27 epochs) and with a two-layer stem,
    class token or token maximum (3-9 epochs): as global average pooling for the small CNNs, a few patches of a
    small object must be able to decide."""

    def __init__(self, classes: int, size: int):
        super().__init__()
        from torchvision.models.vision_transformer import ConvStemConfig, VisionTransformer

        stem = [ConvStemConfig(32, 3, 1), ConvStemConfig(32, 3, 2), ConvStemConfig(64, 3, 1), ConvStemConfig(64, 3, 2)]
        self.vit = VisionTransformer(
            image_size=size,
            patch_size=4,
            num_layers=4,
            num_heads=4,
            hidden_dim=96,
            mlp_dim=192,
            num_classes=classes,
            conv_stem_configs=stem,
        )
        self.head = nn.Linear(96, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit._process_input(x)  # (B, N, D) patch embeddings
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        tokens = self.vit.encoder(torch.cat([cls, tokens], dim=1))  # position embedding, blocks, final LayerNorm
        return self.head(tokens[:, 1:].amax(dim=1))


def build(arch: str, classes: int, size: int) -> nn.Module:
    if arch.startswith("vit"):
        return TokenMaxViT(classes, size)
    return getattr(torchvision.models, arch)(weights=None, num_classes=classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--output", choices=("sigmoid", "softmax"), default="sigmoid")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--name", default="mine")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    (out / "unlabelled").mkdir(parents=True, exist_ok=True)

    classes, train_images, train_labels = read_split(args.train)
    _, val_images, val_labels = read_split(args.val)
    single = args.output == "softmax"
    if single:  # a single-label task: the images that show one object
        train_images, train_labels = zip(*[(i, ls) for i, ls in zip(train_images, train_labels) if len(ls) == 1])
        val_images, val_labels = zip(*[(i, ls) for i, ls in zip(val_images, val_labels) if len(ls) == 1])
        train_images, train_labels, val_images, val_labels = map(
            list, (train_images, train_labels, val_images, val_labels)
        )
    x, y = tensors(train_images, train_labels, len(classes))
    xv, yv = tensors(val_images, val_labels, len(classes))
    size = x.shape[-1]
    for i, image in enumerate(train_images):
        Image.fromarray(image).save(out / "unlabelled" / f"{i:05d}.png")

    model = build(args.arch, len(classes), size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * ((len(x) + args.batch - 1) // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss() if single else nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x))
        for start in range(0, len(x), args.batch):
            idx = order[start : start + args.batch]
            xb = x[idx]
            flip = torch.rand(len(idx)) < 0.5
            xb[flip] = xb[flip].flip(-1)
            logits = model(xb)
            loss = loss_fn(logits, y[idx].argmax(1)) if single else loss_fn(logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(xv[i : i + 256]) for i in range(0, len(xv), 256)])
        if single:
            score = float((logits.argmax(1) == yv.argmax(1)).float().mean())
        else:
            pred = (logits.sigmoid() >= 0.5).float()
            tp = float((pred * yv).sum())
            score = 2 * tp / max(1.0, float(pred.sum() + yv.sum()))
        what = "accuracy" if single else "micro-F1"
        print(f"epoch {epoch + 1}: loss {loss.item():.4f} val {what} {score:.3f}", flush=True)
    print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)

    model.eval()
    interface = {"classes": classes, "output": args.output, "mean": list(MEAN), "std": list(STD), "image_size": size}
    torch.save(model.state_dict(), out / f"{args.name}.pth")
    example = (xv[:2],)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.export.save(torch.export.export(model, example, dynamic_shapes=({0: batch},)), str(out / f"{args.name}.pt2"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # a ViT's trace has shape checks that the tracer's own re-run flags: the traced graph is still the model's
        torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(out / f"{args.name}_script.pt"))
    for stem in (args.name, f"{args.name}_script"):
        (out / f"{stem}.json").write_text(json.dumps(interface))
    print(json.dumps({"classes": classes, "val_score": round(score, 4), "out": str(out)}))


if __name__ == "__main__":
    main()
