"""The classifier being explained (F), loaded from the form the user has, with its interface.

``explanandum.model`` (``explanandum.model`` is its alias) names F. A file (local path, ``file://`` or
``s3://``) is recognised by its content, never by its name:

- a **wysiwyc classifier checkpoint** (``wysiwyc train classifier``): it carries its interface;
- a **TorchScript** file (``torch.jit.save``): TorchScript's own loader, which builds tensors and scripted
  modules only (no Python object is unpickled);
- a **torch.export program** (``torch.export.save``, ``.pt2``): checked pickle-free (:func:`check_pickle_free`)
  before ``torch.export.load``, which would otherwise unpickle records marked so;
- with ``explanandum.arch: torchvision:NAME``: a torchvision architecture of ``len(classes)`` outputs and
  ``explanandum.weights``, its whole state dict (``torch.load(weights_only=True)``).

``models:/NAME@alias`` or ``models:/NAME/V`` is a classifier registered with ``wysiwyc register --classifier``
or an MLflow pytorch-flavour model: a ``pt2`` one loads as an exported program; a pickled one (``torch.save``
of the module, which runs code from the file when loaded) only with ``explanandum.allow_pickle: true``.

The **interface** (``classes`` in output order, ``output``: sigmoid | softmax, ``image_size``, ``mean``,
``std``) is read from the model where it carries it (a wysiwyc checkpoint; a registered version's metadata;
a sidecar ``NAME.json`` beside a file ``NAME.pt2``/``NAME.pt``), otherwise from ``explanandum.*``; a key
set in both must agree. A probe forward at two batch sizes checks that F returns (B, C) logits.

Whatever the form, the stages see a :class:`Classifier`: called on images normalised F's way (its
``mean``/``std``, so a masked pixel, 0, is F's mean colour), it resizes them to F's ``image_size`` when
they differ and returns F's logits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import pickletools
import re
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as Fn
from torch import nn

from pipeline import checkpoint as ckpt
from pipeline import storage, tracking
from pipeline.config import ExplanandumConfig
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalization
from pipeline.errors import WysiwycError, first_line
from pipeline.models.explanandum import build_explanandum, freeze_explanandum, load_weights

log = logging.getLogger(__name__)

OUTPUTS = ("sigmoid", "softmax")
TORCHVISION = "torchvision:"
_EXPORT_HOWTO = (
    "export with a dynamic batch dimension, e.g. `torch.export.save(torch.export.export(model.eval(), (x,), "
    'dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}), "model.pt2")`'
)


@dataclass(frozen=True)
class Interface:
    """What F takes and returns: ``classes`` in output order, ``output`` (sigmoid: multi-label, softmax:
    single-label), ``image_size`` (None: any; the Explainer's size), ``mean``/``std`` of F's normalisation
    (of pixels in [0, 1])."""

    classes: tuple[str, ...]
    output: str = "sigmoid"
    image_size: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def normalization(self) -> Normalization:
        return Normalization(self.mean, self.std)

    def record(self) -> dict:
        return {**asdict(self), "classes": list(self.classes), "mean": list(self.mean), "std": list(self.std)}


@dataclass
class Classifier:
    """F, frozen, as the stages use it: ``classifier(x)`` → logits (B, C) of images (B, 3, H, W) normalised
    F's way (resized to ``interface.image_size`` first when that differs from H × W)."""

    module: nn.Module
    interface: Interface
    uri: str
    sha256: str
    form: str
    arch: str | None = None
    data: bytes | None = field(default=None, repr=False)  # the file of a TorchScript / exported F (pickling)

    def __getstate__(self) -> dict:
        """Pickled (a Ray object, an actor's argument) as its file's bytes when F is a TorchScript file or an
        exported program, whose modules do not pickle; it is loaded again on the other side."""
        state = dict(self.__dict__)
        if self.data is not None:
            state["module"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.module is None:
            self.module = (
                _load_export(self.data, self.uri)[0]
                if self.form == "export"
                else _load_torchscript(self.data, self.uri)
            )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = self.interface.image_size
        if size and tuple(x.shape[-2:]) != (size, size):
            x = Fn.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=x.shape[-1] > size)
        return self.module(x)

    @property
    def classes(self) -> list[str]:
        return list(self.interface.classes)

    @property
    def single_label(self) -> bool:
        return self.interface.output == "softmax"

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """F's probabilities from its logits: per-class sigmoids, or the softmax over classes."""
        return torch.softmax(logits, dim=1) if self.single_label else torch.sigmoid(logits)

    def labels(self, logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """F's own prediction as multi-hot labels (B, C): probabilities ≥ ``threshold``, or the softmax's top-1."""
        if self.single_label:
            return Fn.one_hot(logits.argmax(dim=1), logits.shape[1]).to(logits.dtype)
        return (torch.sigmoid(logits) >= threshold).to(logits.dtype)

    def to(self, device, memory_format=None) -> Classifier:
        self.module.to(device)
        if memory_format is not None and self.form != "export":  # an exported graph keeps its own layout
            self.module.to(memory_format=memory_format)
        return self

    def record(self) -> dict:
        """What an Explainer checkpoint records of the F it explains (the URI without user:password)."""
        return {
            "uri": storage.redact(self.uri),
            "sha256": self.sha256,
            "arch": self.arch,
            "form": self.form,
            "interface": self.interface.record(),
        }


# ---------------------------------------------------------------------------------------------------
# The interface


def read_classes(value: list[str] | str, opts=None) -> tuple[str, ...]:
    """``explanandum.classes``: a list, or the URI of a text file with one class name a line (blank lines
    ignored); names must be unique."""
    if isinstance(value, str):
        try:
            text = storage.read_bytes(value, opts).decode("utf-8")
        except storage.NotFound:
            raise WysiwycError(
                f"explanandum.classes: the class list {storage.redact(value)} does not exist; give a list or "
                f"the URI of a text file with one class name a line, in F's output order"
            ) from None
        names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        names = [str(n).strip() for n in value]
    if not names:
        raise WysiwycError("explanandum.classes: the class list is empty; give F's class names in output order")
    seen: set[str] = set()
    duplicates = sorted({n for n in names if n in seen or seen.add(n)})
    if duplicates:
        raise WysiwycError(
            f"explanandum.classes: class names must be unique, {', '.join(map(repr, duplicates))} appear more than "
            "once; F's outputs are matched to classes by name"
        )
    return tuple(names)


def resolve_interface(carried: dict, cfg, source: str, opts=None) -> Interface:
    """The interface from what the model carries (``carried``), completed by ``explanandum.*`` (``cfg``):
    a key in both must agree; ``classes``, ``output``, ``mean`` and ``std`` must be known from one of them."""
    given: dict[str, Any] = {}
    if cfg.classes is not None:
        given["classes"] = read_classes(cfg.classes, opts)
    for key in ("output", "image_size"):
        if getattr(cfg, key) is not None:
            given[key] = getattr(cfg, key)
    for key in ("mean", "std"):
        if getattr(cfg, key) is not None:
            given[key] = tuple(float(v) for v in getattr(cfg, key))
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in carried.items() if v is not None}
    for key, value in given.items():
        if key in values and _differs(values[key], value):
            raise WysiwycError(
                f"explanandum.{key}={_show(value)} but {storage.redact(source)} carries {key} {_show(values[key])}: "
                f"leave explanandum.{key} unset (the model's own interface is used)"
            )
        values.setdefault(key, value)
    missing = [k for k in ("classes", "output", "mean", "std") if k not in values]
    if missing:
        raise WysiwycError(
            f"{storage.redact(source)} does not carry its interface: set "
            + ", ".join(f"explanandum.{k}" for k in missing)
            + " (classes: F's class names in output order, or a text file of them; output: sigmoid for a "
            "multi-label classifier, softmax for a single-label one; mean/std: F's input normalisation of "
            "pixels in [0, 1], e.g. ImageNet's [0.485, 0.456, 0.406] / [0.229, 0.224, 0.225]), or write them "
            "in a sidecar JSON file beside the model (NAME.json for NAME.pt2)"
        )
    if values["output"] not in OUTPUTS:
        raise WysiwycError(f"explanandum.output: {values['output']!r} is not one of {', '.join(OUTPUTS)}")
    for key in ("mean", "std"):
        if len(values[key]) != 3 or (key == "std" and min(values[key]) <= 0):
            raise WysiwycError(f"explanandum.{key}: three numbers, one per RGB channel (std > 0), got {values[key]}")
    return Interface(
        classes=read_classes(list(values["classes"])),
        output=values["output"],
        image_size=int(values["image_size"]) if values.get("image_size") else None,
        mean=tuple(float(v) for v in values["mean"]),
        std=tuple(float(v) for v in values["std"]),
    )


def _differs(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return any((x != y) if isinstance(x, str) else abs(float(x) - float(y)) > 1e-6 for x, y in zip(a, b))
    return a != b


def _show(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _sidecar(uri: str, opts=None) -> dict:
    """The interface written beside a model file: ``NAME.json`` for ``NAME.pt2`` (empty when there is none)."""
    base = uri.rsplit("/", 1)
    stem = base[-1].rsplit(".", 1)[0] if "." in base[-1] else base[-1]
    url = (base[0] + "/" if len(base) == 2 else "") + stem + ".json"
    try:
        data = storage.read_bytes(url, opts)
    except storage.NotFound:
        return {}
    try:
        record = json.loads(data)
    except json.JSONDecodeError as e:
        raise WysiwycError(f"{storage.redact(url)}: the classifier's sidecar is not JSON ({e})") from None
    if not isinstance(record, dict):
        raise WysiwycError(f"{storage.redact(url)}: the classifier's sidecar must be a JSON object of interface keys")
    unknown = sorted(set(record) - {"classes", "output", "image_size", "mean", "std"})
    if unknown:
        raise WysiwycError(
            f"{storage.redact(url)}: unknown keys {unknown} in the classifier's sidecar; it holds classes, "
            "output, image_size, mean and std"
        )
    return record


# ---------------------------------------------------------------------------------------------------
# Safe loading


def check_pickle_free(data: bytes, source: str) -> None:
    """Refuse an exported-program archive unless every record is one that loads without unpickling code.

    ``torch.export.load`` unpickles the records an archive marks so (custom and opaque objects, tensor
    subclasses) and its sample inputs with a fall-back to ``torch.load(weights_only=False)``: a crafted
    ``.pt2`` runs code when loaded. Accepted records: the short text records torch writes (``version``,
    ``archive_format`` …), JSON, raw tensor bytes that a payload config marks ``use_pickle: false``, empty
    records, and ``torch.save`` archives whose pickles import nothing but torch's tensor rebuilding and that
    ``torch.load(weights_only=True)`` reads. Anything else (a bare pickle, a shared library) is refused.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise WysiwycError(f"{storage.redact(source)}: not a torch.export archive (not a zip file)") from None
    infos = [info for info in archive.infolist() if not info.is_dir()]
    raw = _raw_tensor_records({i.filename: archive.read(i) for i in infos if _PAYLOAD_CONFIG.search(i.filename)})
    for info in infos:
        if info.filename in raw or info.file_size == 0:
            continue
        why = _unsafe_record(info.filename, archive.read(info))
        if why:
            raise WysiwycError(
                f"{storage.redact(source)}: record {info.filename} of the exported program {why}: loading it could "
                "run code from the file, so it is refused; export the classifier with plain tensors and modules "
                "only, or give its weights as explanandum.arch=torchvision:NAME + explanandum.weights"
            )


_TEXT_RECORDS = {"version", "archive_format", "archive_version", "byteorder", "serialization_id"}
_TEXT_CONTENT = re.compile(rb"[A-Za-z0-9._-]{1,64}\n?")
_PAYLOAD_CONFIG = re.compile(r"(?:^|/)data/(?:weights|constants)/[^/]+_config\.json$")
# what torch.save writes for tensors and containers: the only imports a weights-only pickle needs
_TENSOR_GLOBALS = {
    "torch._utils _rebuild_tensor_v2",
    "torch._utils _rebuild_tensor_v3",
    "torch._utils _rebuild_parameter",
    "collections OrderedDict",
    "torch UntypedStorage",
} | {
    f"torch {t}Storage" for t in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
}


def _raw_tensor_records(configs: dict[str, bytes]) -> set[str]:
    """The records that payload configs mark as raw tensor bytes (``use_pickle: false``, ``weight_``/``tensor_``)."""
    raw, pickled = set(), set()
    for name, content in configs.items():
        try:
            entries = json.loads(content)["config"].values()
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
        folder = name.rsplit("/", 1)[0]
        for entry in entries:
            path = entry.get("path_name") if isinstance(entry, dict) else None
            if not isinstance(path, str) or "/" in path:
                continue
            plain = entry.get("use_pickle") is False and path.startswith(("weight_", "tensor_"))
            (raw if plain else pickled).add(f"{folder}/{path}")
    return raw - pickled


def _unsafe_record(name: str, content: bytes) -> str | None:
    """Why a record of an exported program is not pickle-free, or None when it is."""
    if name.rsplit("/", 1)[-1] in _TEXT_RECORDS and _TEXT_CONTENT.fullmatch(content):
        return None
    try:
        json.loads(content.decode("utf-8"))
        return None
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        inner = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile:
        return "is neither text, JSON, raw tensor bytes nor a weights-only torch file (a pickle?)"
    pickles = [n for n in inner.namelist() if n.rsplit("/", 1)[-1] == "data.pkl"]
    if not pickles:
        return "is a zip archive without tensors"
    imports = set().union(*(_pickle_imports(inner.read(n)) for n in pickles)) - _TENSOR_GLOBALS
    if imports:
        return f"imports {', '.join(sorted(imports)[:3])}"
    try:
        torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        return f"is refused by torch.load(weights_only=True) ({first_line(e)})"
    return None


def _pickle_imports(data: bytes) -> set[str]:
    """The ``module name`` pairs a pickle imports (GLOBAL / INST / STACK_GLOBAL), read without unpickling;
    a pickle that cannot be read statically: ``{"?"}``."""
    found: set[str] = set()
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("GLOBAL", "INST"):
                found.add(str(arg))
            elif opcode.name == "STACK_GLOBAL":
                found.add(" ".join(strings[-2:]) if len(strings) >= 2 else "?")
                strings = []
            elif "UNICODE" in opcode.name or "STRING" in opcode.name:
                strings.append(str(arg))
            elif opcode.name not in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                strings = []
    except Exception:  # noqa: BLE001 - a pickle we cannot read is not one we load
        return {"? (unreadable pickle)"}
    return found


def _archive_kind(data: bytes) -> str:
    """``export``, ``torchscript`` or ``torch`` (anything else torch.load might read) of a model file."""
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        return "torch"  # the legacy torch.save format, text, or nothing: torch.load says which
    if any(n.endswith("archive_format") for n in names):
        return "export"
    if any("/code/__torch__" in n or n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    return "torch"


def _load_export(data: bytes, source: str) -> tuple[nn.Module, dict]:
    """An exported program's module (pickle-checked first) and what it carries: its input side when the
    program was exported with a fixed square image size."""
    check_pickle_free(data, source)
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001
        raise WysiwycError(f"{storage.redact(source)}: torch.export.load cannot read it ({first_line(e)})") from None
    carried = {}
    inputs = set(program.graph_signature.user_inputs)
    shapes = [n.meta["val"].shape for n in program.graph.nodes if n.op == "placeholder" and n.name in inputs]
    if len(shapes) == 1 and len(shapes[0]) == 4 and all(isinstance(d, int) for d in shapes[0][2:]):
        height, width = shapes[0][2:]
        if height == width:
            carried["image_size"] = int(height)
    module = program.module()
    module.requires_grad_(False)
    log.info("%s is an exported program: its train/eval mode was fixed when it was exported", storage.redact(source))
    return module, carried


def _load_torchscript(data: bytes, source: str) -> nn.Module:
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:  # noqa: BLE001
        raise WysiwycError(f"{storage.redact(source)}: torch.jit.load cannot read it ({first_line(e)})") from None
    module.eval()
    for parameter in module.parameters():  # a ScriptModule has no requires_grad_
        parameter.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------------------
# Loading


def model_uri(cfg) -> str:
    """``explanandum.model`` (or its alias ``checkpoint``), or a clear error when neither is set."""
    uri = cfg.model or cfg.checkpoint
    if not uri:
        raise WysiwycError(
            "explanandum.model is not set: give the classifier to explain (a wysiwyc classifier checkpoint, a "
            "TorchScript or torch.export file, models:/NAME@alias, or explanandum.arch=torchvision:NAME with "
            "explanandum.weights), or train one first with `wysiwyc train classifier`"
        )
    return str(uri)


def load_classifier(cfg, opts=None, probe_size: int | None = None, registry: str | None = None) -> Classifier:
    """F from the ``explanandum`` config section, frozen, its interface validated and its forward probed.

    Args:
        cfg: :class:`pipeline.config.ExplanandumConfig`.
        opts: :class:`pipeline.storage.S3Options` for ``s3://`` URIs.
        probe_size: the image side to probe with when F has no ``image_size`` (the Explainer's size).
        registry: the MLflow registry of ``models:/`` URIs (default: :func:`pipeline.tracking.registry_uri`).

    Raises:
        WysiwycError: an unreadable or unsafe file, a missing interface key, or outputs that are not
            (B, len(classes)) logits.
    """
    arch = str(cfg.arch)
    if arch.startswith(TORCHVISION):
        classifier = _torchvision(arch[len(TORCHVISION) :], cfg, opts)
    else:
        uri = model_uri(cfg)
        if uri.startswith(tracking.REGISTRY_PREFIX):
            classifier = _registered(uri, cfg, opts, registry)
        else:
            classifier = _from_bytes(_read(uri, opts), uri, cfg, opts, sidecar=True)
    probe(classifier, probe_size)
    return classifier


def recorded_classifier(record: dict, uri: str, opts=None, registry: str | None = None) -> Classifier:
    """The F an Explainer checkpoint records (``record``: :meth:`Classifier.record`), read from ``uri`` (the
    recorded location, or the copy a registered Explainer package carries) with the recorded interface."""
    interface = record.get("interface") or {}
    arch = str(record.get("arch") or "")
    torchvision = arch.startswith(TORCHVISION) and record.get("form") == "torchvision"
    cfg = ExplanandumConfig(
        arch=arch if torchvision else "small_cnn",
        model=None if torchvision else uri,
        weights=uri if torchvision else None,
        classes=interface.get("classes"),
        output=interface.get("output"),
        image_size=interface.get("image_size"),
        mean=interface.get("mean"),
        std=interface.get("std"),
        allow_pickle=record.get("form") == "mlflow-pickle",  # it was allowed when the Explainer was trained
    )
    return load_classifier(cfg, opts, registry=registry)


@dataclass
class _Version:
    """A registered classifier version's model file: ``kind`` wysiwyc (artifacts/classifier.pt), pt2 or
    pickle (an MLflow pytorch model's data/model.pt2 | model.pth), the interface its MLmodel ``metadata``
    carries, and the version's folder (removed when the ``with`` of :func:`_version_file` ends)."""

    pinned: str  # models:/NAME/V
    path: Path
    kind: str
    carried: dict
    folder: Path


@contextlib.contextmanager
def _version_file(uri: str, registry: str | None):
    import yaml

    with tracking.downloaded_version(uri, registry) as version:
        pinned = f"models:/{version.name}/{version.version}"
        wysiwyc_file = version.folder / "artifacts" / "classifier.pt"
        if wysiwyc_file.is_file():
            recorded = version.tags.get(tracking.CLASSIFIER_SHA)
            if recorded and recorded != hashlib.sha256(wysiwyc_file.read_bytes()).hexdigest():
                raise WysiwycError(
                    f"{uri} (version {version.version}): the downloaded classifier.pt is not the registered one "
                    f"({tracking.CLASSIFIER_SHA} {recorded[:16]}…); register the checkpoint again"
                )
            yield _Version(pinned, wysiwyc_file, "wysiwyc", {}, version.folder)
            return
        mlmodel = version.folder / "MLmodel"
        spec = yaml.safe_load(mlmodel.read_text()) if mlmodel.is_file() else {}
        flavour = (spec.get("flavors") or {}).get("pytorch")
        if not flavour:
            raise WysiwycError(
                f"explanandum.model: {uri} (version {version.version}) is neither a wysiwyc classifier nor an MLflow "
                "pytorch-flavour model; log it with mlflow.pytorch.log_model"
            )
        carried = {k: v for k, v in (spec.get("metadata") or {}).items() if k in Interface.__dataclass_fields__}
        data = version.folder / str(flavour.get("model_data") or "data")
        for name, kind in (("model.pth", "pickle"), ("model.pt2", "pt2")):
            if (data / name).is_file():
                yield _Version(pinned, data / name, kind, carried, version.folder)
                return
        raise WysiwycError(f"explanandum.model: {uri} (version {version.version}) has no model file in {data.name}/")


def _registered(uri: str, cfg, opts, registry: str | None) -> Classifier:
    """A classifier registered with ``wysiwyc register --classifier``, or an MLflow pytorch-flavour model (its
    interface in the ``metadata`` of its MLmodel file, else in ``explanandum.*``)."""
    with _version_file(uri, registry) as found:
        if found.kind == "pickle":
            return _pickled(found.path, found.folder, found.pinned, cfg, opts, found.carried)
        return _from_bytes(found.path.read_bytes(), found.pinned, cfg, opts, sidecar=False, carried=found.carried)


def classifier_file(uri: str, opts=None, registry: str | None = None) -> bytes:
    """The bytes of the classifier at ``uri`` that a registered Explainer carries beside it: the file itself,
    or a registered version's model file (a pickled one is refused: it is not code-free)."""
    if not uri.startswith(tracking.REGISTRY_PREFIX):
        return _read(uri, opts)
    with _version_file(uri, registry) as found:
        if found.kind == "pickle":
            raise WysiwycError(
                f"{uri} is an MLflow pytorch model saved as a pickle: a registered Explainer carries its classifier "
                "in a code-free form; log the classifier again in the pt2 format (serialization_format='pt2')"
            )
        return found.path.read_bytes()


def _pickled(path: Path, folder: Path, uri: str, cfg, opts, carried: dict) -> Classifier:
    """An MLflow pytorch model saved as a pickle: only with ``explanandum.allow_pickle``."""
    if not cfg.allow_pickle:
        raise WysiwycError(
            f"explanandum.model: {uri} is an MLflow pytorch model saved as a pickle (data/model.pth): loading it "
            "runs code from the file, so it is refused. Log it again in the pt2 format "
            "(mlflow.pytorch.log_model(model, name=..., input_example=x, serialization_format='pt2')), or, if you "
            "trust whoever wrote it, set explanandum.allow_pickle=true"
        )
    import mlflow.pytorch

    log.warning("%s: loading a pickled model (explanandum.allow_pickle=true)", uri)
    module = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    interface = resolve_interface(carried, cfg, uri, opts)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    return Classifier(freeze_explanandum(module), interface, uri, sha, "mlflow-pickle")


def _read(uri: str, opts) -> bytes:
    try:
        return storage.read_bytes(uri, opts)
    except storage.NotFound:
        raise WysiwycError(
            f"explanandum.model: {storage.redact(uri)} does not exist; give the classifier's file (local path or "
            "s3://) or models:/NAME@alias"
        ) from None


def _from_bytes(data: bytes, uri: str, cfg, opts, sidecar: bool, carried: dict | None = None) -> Classifier:
    sha = hashlib.sha256(data).hexdigest()
    kind = _archive_kind(data)
    if kind in ("export", "torchscript"):
        module, own = _load_export(data, uri) if kind == "export" else (_load_torchscript(data, uri), {})
        given = {**own, **(_sidecar(uri, opts) if sidecar else {}), **(carried or {})}
        return Classifier(module, resolve_interface(given, cfg, uri, opts), uri, sha, kind, data=data)
    state = _torch_file(data, uri)
    if sidecar:  # a file of its own (not one carried by a registered version, checked against its tag)
        ckpt.checked_digest(data, uri, opts)
    if state.get("kind") != "classifier":
        raise WysiwycError(
            f"explanandum.model: {storage.redact(uri)} is a {state.get('kind')} checkpoint, not a classifier"
        )
    model = freeze_explanandum(build_explanandum(state["arch"], len(state["classes"]), weights=state["model"]))
    carried = {
        "classes": state["classes"],
        "output": "sigmoid",
        "image_size": state.get("image_size"),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    interface = resolve_interface(carried, cfg, uri, opts)
    return Classifier(model, interface, uri, sha, "wysiwyc", arch=state["arch"])


def _torch_file(data: bytes, uri: str) -> dict:
    """A wysiwyc checkpoint, or an error that says what the file is and how to give it instead."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        return ckpt.parse_checkpoint(data, uri)  # raises, saying what the file holds
    if isinstance(state, dict) and state.get("format") == ckpt.FORMAT:
        return state
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WysiwycError(
            f"explanandum.model: {storage.redact(uri)} is a bare state dict (weights without the network): set "
            "explanandum.arch=torchvision:NAME (e.g. torchvision:resnet18) and "
            f"explanandum.weights={storage.redact(uri)}, with explanandum.classes/output/mean/std; or save the "
            "classifier with torch.export.save"
        )
    return ckpt.parse_checkpoint(data, uri)  # raises: another program's torch file


def _torchvision(name: str, cfg, opts) -> Classifier:
    import torchvision

    if not cfg.weights:
        raise WysiwycError(
            f"explanandum.arch=torchvision:{name} needs explanandum.weights: the URI of the classifier's whole "
            "state dict (model.state_dict() saved with torch.save)"
        )
    if cfg.model:  # a preset's default, say: the torchvision form names F by its weights
        log.warning(
            "explanandum.model=%s is not read: explanandum.arch=torchvision:%s takes F from explanandum.weights",
            storage.redact(cfg.model),
            name,
        )
    builder = getattr(torchvision.models, name, None)
    if name.startswith("_") or not callable(builder) or name not in torchvision.models.list_models():
        raise WysiwycError(
            f"explanandum.arch=torchvision:{name}: torchvision has no classification model {name!r} "
            "(torchvision.models.list_models() names them, e.g. resnet18, vit_b_16)"
        )
    uri = str(cfg.weights)
    data = _read(uri, opts)
    interface = resolve_interface(_sidecar(uri, opts), cfg, uri, opts)
    model = builder(weights=None, num_classes=len(interface.classes))  # never downloads
    model.wysiwyc_arch = f"{TORCHVISION}{name}"
    load_weights(model, data, "explanandum", len(interface.classes), key="weights")
    return Classifier(
        freeze_explanandum(model),
        interface,
        uri,
        hashlib.sha256(data).hexdigest(),
        "torchvision",
        arch=f"{TORCHVISION}{name}",
    )


def probe(classifier: Classifier, size: int | None) -> None:
    """One forward at batch sizes 1 and 2: F must return (B, C) logits for its C classes."""
    side = classifier.interface.image_size or size or 224
    c = len(classifier.interface.classes)
    device = next(iter(classifier.module.parameters()), torch.empty(0)).device
    for batch in (2, 1):
        x = torch.zeros(batch, 3, side, side, device=device)
        try:
            with torch.no_grad():
                out = classifier(x)
        except Exception as e:  # noqa: BLE001
            hint = f"; {_EXPORT_HOWTO}" if classifier.form == "export" else ""
            raise WysiwycError(
                f"explanandum.model: {storage.redact(classifier.uri)} fails on a batch of {batch} images of "
                f"{side}×{side} ({first_line(e)}){hint}"
            ) from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != batch:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise WysiwycError(
                f"explanandum.model: {storage.redact(classifier.uri)} returns {shape} for {batch} images; F must "
                "return logits of shape (batch, classes)"
            )
        if out.shape[1] != c:
            raise WysiwycError(
                f"explanandum.classes: {c} classes, but {storage.redact(classifier.uri)} returns {out.shape[1]} "
                "outputs per image; give its class names in output order, one per output"
            )
