"""Explaining the user's own classifier: every form ``explanandum.model`` reads, its interface, safe loading,
single-label (softmax) classifiers and labels from F, through the loader and a training run.

The classifiers come from ``tests/model/outside.py`` (torch and torchvision only, a normalisation that is not
ImageNet's)."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from outside import MEAN, STD, resnet18, save_export, save_torchscript, sidecar, tiny

from pipeline import storage
from pipeline.config import ExplanandumConfig, load_config
from pipeline.errors import WysiwycError
from pipeline.method.losses import classification_loss, distillation_loss
from pipeline.models.classifier import check_pickle_free, load_classifier
from pipeline.models.explanandum import BlackBox

CLASSES = ["circle", "square", "triangle"]
SIZE = 16


def _x(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _synthetic(tmp_path: Path, num_images: int, seed: int, split: str, shard_size: int = 16) -> str:
    """A synthetic split of 32-px images under ``tmp_path/data``; returns its prefix."""
    from pipeline.config import IngestConfig
    from pipeline.data.ingest import ingest
    from pipeline.data.synthetic import SyntheticReader

    reader = SyntheticReader(num_images, seed, split, image_size=32)
    ingest(reader, str(tmp_path / "data"), split, IngestConfig(workers=1, shard_size=shard_size), progress=False)
    return f"{tmp_path / 'data'}/{split}"


def _registry(tmp_path: Path, models: dict[str, tuple], interface: dict) -> str:
    """A sqlite MLflow registry in ``tmp_path`` with ``{name: (module, log_model kwargs)}`` logged as versions 1
    (artifacts in tmp_path: a sqlite store's default is ./mlruns of the working folder); returns its URI."""
    import mlflow
    import mlflow.pytorch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)  # also sets MLFLOW_TRACKING_URI for subprocesses: unset below
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("byo", (tmp_path / "artifacts").as_uri()))
        with mlflow.start_run():
            for name, (module, kwargs) in models.items():
                mlflow.pytorch.log_model(
                    module, name=name, input_example=_x(2).numpy(), registered_model_name=name, metadata=interface,
                    **kwargs,
                )  # fmt: skip
    finally:
        mlflow.set_tracking_uri(None)
    return uri


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict:
    """One tiny classifier in every file form, each with its sidecar; and a resnet18's state dict."""
    root = tmp_path_factory.mktemp("byo")
    model = tiny(len(CLASSES))
    out = {"module": model, "root": root}
    out["export"] = save_export(model, root / "tiny.pt2", SIZE)
    out["torchscript"] = save_torchscript(model, root / "tiny_script.pt")
    for name in ("tiny.pt2", "tiny_script.pt"):
        sidecar(root / name, CLASSES, "sigmoid")
    net = resnet18(len(CLASSES))
    torch.save(net.state_dict(), root / "resnet18.pth")
    out["resnet18"] = net
    out["resnet18_script"] = save_torchscript(net, root / "resnet18_script.pt")
    return out


def _cfg(**keys) -> ExplanandumConfig:
    return ExplanandumConfig(**keys)


@pytest.mark.parametrize("form", ["export", "torchscript"])
def test_a_file_loads_by_its_content_with_its_sidecar_and_gives_the_modules_logits(forms, form):
    f = load_classifier(_cfg(model=str(forms[form])))
    assert f.form == form
    assert f.classes == CLASSES and f.interface.output == "sigmoid"
    assert f.interface.mean == MEAN and f.interface.std == STD
    x = _x()
    torch.testing.assert_close(f(x), forms["module"](x), rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for p in f.module.parameters())
    # gradients flow through F to the input (the loss backpropagates through its outputs)
    x.requires_grad_(True)
    f(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # pickled (a Ray object: batch attribution's actors) as its file, loaded again on the other side
    again = pickle.loads(pickle.dumps(f))
    torch.testing.assert_close(again(x.detach()), f(x.detach()))
    assert again.form == form and again.sha256 == f.sha256
    # the stages see it only as a function
    box = BlackBox(f)
    torch.testing.assert_close(box(x.detach()), f(x.detach()))
    with pytest.raises(WysiwycError, match="black box"):
        box.module  # noqa: B018


def test_torchvision_name_and_state_dict_equal_the_torchscript_file_of_the_same_weights(forms):
    by_name = load_classifier(
        _cfg(
            arch="torchvision:resnet18",
            weights=str(forms["root"] / "resnet18.pth"),
            classes=CLASSES,
            output="sigmoid",
            mean=list(MEAN),
            std=list(STD),
        )
    )
    scripted = load_classifier(
        _cfg(model=str(forms["resnet18_script"]), classes=CLASSES, output="sigmoid", mean=list(MEAN), std=list(STD))
    )
    assert by_name.form == "torchvision" and by_name.arch == "torchvision:resnet18"
    x = _x(2)
    torch.testing.assert_close(by_name(x), scripted(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_name(x), forms["resnet18"](x), rtol=1e-5, atol=1e-5)
    assert not by_name.module.training  # frozen in eval mode


def test_an_export_without_a_dynamic_batch_is_refused_saying_how_to_export(forms, tmp_path):
    path = save_export(forms["module"], tmp_path / "static.pt2", SIZE, dynamic=False)
    sidecar(path, CLASSES, "sigmoid")
    with pytest.raises(WysiwycError, match=r"fails on a batch of 1 images.*dynamic_shapes"):
        load_classifier(_cfg(model=str(path)))


def test_wrong_class_count_and_missing_interface_keys_name_the_key(forms, tmp_path):
    with pytest.raises(WysiwycError, match=r"explanandum.classes: 2 classes, but .* returns 3 outputs"):
        load_classifier(
            _cfg(
                model=str(forms["resnet18_script"]),
                classes=["a", "b"],
                output="sigmoid",
                mean=list(MEAN),
                std=list(STD),
            )
        )
    bare = tmp_path / "bare.pt2"
    bare.write_bytes(forms["export"].read_bytes())  # no sidecar
    with pytest.raises(WysiwycError, match=r"set explanandum.classes, explanandum.output, explanandum.mean"):
        load_classifier(_cfg(model=str(bare)))
    with pytest.raises(WysiwycError, match=r"explanandum.output=\"softmax\" but .* carries output \"sigmoid\""):
        load_classifier(_cfg(model=str(forms["export"]), output="softmax"))
    names = tmp_path / "classes.txt"
    names.write_text("circle\nsquare\n\ncircle\n")
    with pytest.raises(WysiwycError, match=r"explanandum.classes: class names must be unique, 'circle'"):
        load_classifier(_cfg(model=str(bare), classes=str(names), output="sigmoid", mean=list(MEAN), std=list(STD)))
    names.write_text("circle\nsquare\ntriangle\n")  # a class file in output order works
    f = load_classifier(_cfg(model=str(bare), classes=str(names), output="softmax", mean=list(MEAN), std=list(STD)))
    assert f.classes == CLASSES and f.single_label


def test_bare_state_dict_and_pickled_module_are_refused_with_the_way_to_give_them(forms, tmp_path):
    with pytest.raises(WysiwycError, match=r"bare state dict .* explanandum.arch=torchvision:NAME"):
        load_classifier(_cfg(model=str(forms["root"] / "resnet18.pth")))
    pickled = tmp_path / "module.pt"
    torch.save(forms["module"], pickled)  # the whole module: loading it would unpickle code
    with pytest.raises(WysiwycError, match="could run code"):
        load_classifier(_cfg(model=str(pickled)))
    with pytest.raises(WysiwycError, match="torchvision has no classification model 'nonet'"):
        load_classifier(_cfg(arch="torchvision:nonet", weights=str(pickled), classes=CLASSES))


def test_model_and_its_alias_checkpoint_set_differently_is_a_config_error(tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text("explanandum:\n  model: a.pt\n  checkpoint: b.pt\n")
    with pytest.raises(WysiwycError, match="its alias explanandum.checkpoint=b.pt differ: set one of them"):
        load_config(both)
    # the alias alone (and on the command line, over a file's model) is the model; dumped configs say model
    cfg = load_config("cpu/explainer", ["explanandum.checkpoint=c.pt"])
    assert cfg.explanandum.model == "c.pt" and cfg.explanandum.checkpoint is None


class _Evil:
    def __reduce__(self):
        return (print, ("PWNED",))


def _with_record(archive: bytes, name: str, data: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(archive)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        prefix = src.namelist()[0].split("/", 1)[0]
        dst.writestr(f"{prefix}/{name}", data)
    return out.getvalue()


def test_pickle_check_refuses_crafted_archives_and_agrees_with_mlflows(forms, tmp_path, capfd):
    from mlflow.exceptions import MlflowException
    from mlflow.pytorch import _validate_pt2_archive_is_pickle_free as mlflow_check  # the peer

    honest = forms["export"].read_bytes()
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf)  # a torch file whose pickle imports our class (weights_only refuses it)
    crafted = {
        "bare pickle": _with_record(honest, "data/constants/opaque_obj_0", pickle.dumps(_Evil())),
        "torch file with an object": _with_record(honest, "data/sample_inputs/extra.pt", buf.getvalue()),
    }
    (tmp_path / "honest.pt2").write_bytes(honest)
    check_pickle_free(honest, "honest.pt2")
    mlflow_check(str(tmp_path / "honest.pt2"))
    for name, data in crafted.items():
        path = tmp_path / f"{name.replace(' ', '_')}.pt2"
        path.write_bytes(data)
        with pytest.raises(WysiwycError, match="could run code"):
            check_pickle_free(data, str(path))
        with pytest.raises(MlflowException):
            mlflow_check(str(path))
        sidecar(path, CLASSES, "sigmoid")
        with pytest.raises(WysiwycError, match="refused"):
            load_classifier(_cfg(model=str(path)))
    assert "PWNED" not in capfd.readouterr().out  # nothing of the crafted records ran


def test_a_classifier_on_s3_loads_with_its_sidecar(forms, s3_server, s3_bucket):
    opts = s3_server.opts
    url = f"s3://{s3_bucket}/models/tiny.pt2"
    storage.write_bytes(url, forms["export"].read_bytes(), opts)
    storage.write_bytes(url.replace(".pt2", ".json"), (forms["root"] / "tiny.json").read_bytes(), opts)
    f = load_classifier(_cfg(model=url), opts)
    assert f.form == "export" and f.classes == CLASSES
    torch.testing.assert_close(f(_x()), forms["module"](_x()), rtol=1e-5, atol=1e-5)


def test_mlflow_pytorch_models_in_a_sqlite_registry(forms, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # the registry is the tracking store
    interface = {"classes": CLASSES, "output": "softmax", "mean": list(MEAN), "std": list(STD)}
    pickled = {"serialization_format": "pickle"}
    uri = _registry(
        tmp_path, {"outside": (forms["module"], {}), "outside-pickled": (forms["module"], pickled)}, interface
    )
    f = load_classifier(_cfg(model="models:/outside/1"), registry=uri)
    assert f.form == "export" and f.uri == "models:/outside/1" and f.single_label
    torch.testing.assert_close(f(_x()), forms["module"](_x()), rtol=1e-5, atol=1e-5)
    probs = f.probabilities(f(_x()))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))
    with pytest.raises(WysiwycError, match=r"saved as a pickle .* explanandum.allow_pickle=true"):
        load_classifier(_cfg(model="models:/outside-pickled/1"), registry=uri)
    trusted = load_classifier(_cfg(model="models:/outside-pickled/1", allow_pickle=True), registry=uri)
    assert trusted.form == "mlflow-pickle"
    torch.testing.assert_close(trusted(_x()), forms["module"](_x()), rtol=1e-5, atol=1e-5)

    # an Explainer checkpoint whose classifier is this version: evaluation finds it in tracking.uri's registry
    # (not the environment's, nor the default one)
    from conftest import explainer_state

    from pipeline.checkpoint import save_checkpoint
    from pipeline.evaluate.evaluate import load_models

    state = explainer_state(CLASSES, SIZE, f.uri, f.sha256, explanandum=f.record())
    save_checkpoint(state, str(tmp_path / "explainer.pt"))
    config = load_config(None, [f"explainer.checkpoint={tmp_path / 'explainer.pt'}", f"tracking.uri={uri}"])
    predictor = load_models(config)
    assert predictor.explanandum.uri == "models:/outside/1" and predictor.explanandum.single_label


def test_labels_from_f_are_its_thresholded_or_top1_predictions(forms):
    f = load_classifier(_cfg(model=str(forms["export"])))
    logits = torch.tensor([[2.0, -1.0, 0.1], [-3.0, -2.0, -0.5]])
    assert f.labels(logits, threshold=0.5).tolist() == [[1, 0, 1], [0, 0, 0]]
    assert f.labels(logits, threshold=0.6).tolist() == [[1, 0, 0], [0, 0, 0]]
    soft = load_classifier(_cfg(model=str(forms["export"]), classes=None, output=None))
    assert not soft.single_label
    single = load_classifier(
        _cfg(model=str(forms["resnet18_script"]), classes=CLASSES, output="softmax", mean=list(MEAN), std=list(STD))
    )
    assert single.labels(logits).tolist() == [[1, 0, 0], [0, 0, 1]]
    torch.testing.assert_close(single.probabilities(logits), logits.softmax(dim=1))


def test_the_softmax_losses_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = logits.exp() / logits.exp().sum(dim=1, keepdim=True)
    by_hand = -(p[0, 0].log() + p[1, 1].log()) / 2  # cross-entropy of the explained class
    torch.testing.assert_close(classification_loss(logits, y, single_label=True), by_hand)
    target = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    by_hand = -(target * p.log()).sum(dim=1).mean()  # the student's softmax against F's (soft targets)
    torch.testing.assert_close(distillation_loss(logits, target, single_label=True), by_hand)
    assert not torch.allclose(distillation_loss(logits, target), by_hand)  # the multi-label BCE differs


def test_an_image_size_of_its_own_resizes_the_masked_images(forms, tmp_path):
    path = save_export(forms["module"], tmp_path / "at24.pt2", 24)
    sidecar(path, CLASSES, "sigmoid", image_size=24)
    f = load_classifier(_cfg(model=str(path)))
    x = _x()
    expected = forms["module"](F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False))
    torch.testing.assert_close(f(x), expected, rtol=1e-5, atol=1e-5)
    assert json.loads(json.dumps(f.record()))["interface"]["image_size"] == 24


def test_an_explainer_for_an_exported_softmax_classifier_trains_on_unlabelled_images(forms, tmp_path):
    """Items 1–4 through training: F a .pt2 of its own normalisation, single-label; the shards unlabelled;
    each image's class is F's top-1; the checkpoint records F; the loaded predictor gives F's softmax."""
    from pipeline.config import IngestConfig
    from pipeline.data.images import ImageFolderReader
    from pipeline.data.ingest import ingest
    from pipeline.data.synthetic import SyntheticReader
    from pipeline.models.predictor import load_model
    from pipeline.train.trainer import fit

    folder = tmp_path / "photos"
    folder.mkdir()
    for sample in SyntheticReader(48, 5, "photos", image_size=32):
        (folder / f"{sample.key}.{sample.ext}").write_bytes(sample.image)
    _synthetic(tmp_path, 16, 6, "val")
    ingest(
        ImageFolderReader(str(folder)),
        str(tmp_path / "data"),
        "train",
        IngestConfig(workers=1, shard_size=16),
        progress=False,
    )
    model = tmp_path / "single.pt2"
    save_export(forms["module"], model, SIZE)
    (tmp_path / "single.json").write_text(
        json.dumps({"classes": CLASSES, "output": "softmax", "mean": list(MEAN), "std": list(STD)})
    )
    overrides = [
        f"data.train={tmp_path / 'data'}/train",
        f"data.image_size={SIZE}",
        "data.loader_workers=0",
        "data.shuffle_buffer=16",
        "trainer.batch_size=16",
        "trainer.epochs=1",
        f"trainer.storage={tmp_path}/ckpt",
        "trainer.run_name=byo",
        "trainer.backend=local",
        "tracking.enabled=false",
        f"explanandum.model={model}",
        "explainer.init=scratch",
        "explainer.cam=false",
    ]
    with pytest.raises(WysiwycError, match="has no labels .* set data.labels=explanandum"):
        fit("explainer", load_config(None, overrides), progress=False)
    # a labelled validation split beside the unlabelled training images: F labels both, its masks score the masks
    labelled_val = [*overrides, "data.labels=explanandum", f"data.val={tmp_path / 'data'}/val"]
    summary = fit("explainer", load_config(None, labelled_val), progress=False)
    assert summary["steps"] == 3 and 0 <= summary["final"]["val_c_iou"] <= 1
    predictor = load_model(summary["checkpoint"])
    record = predictor.checkpoint["explanandum"]
    assert record["form"] == "export" and record["interface"]["output"] == "softmax"
    assert record["interface"]["mean"] == list(MEAN) and predictor.checkpoint["labels"] == "explanandum"
    assert predictor.classes == CLASSES and predictor.norm.mean == MEAN
    pixels = torch.randint(0, 256, (2, 3, SIZE, SIZE), dtype=torch.uint8)
    out = predictor(predictor.normalize(pixels))
    x = (pixels.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(out.probs, forms["module"](x).softmax(dim=1), rtol=1e-5, atol=1e-5)
    assert out.masks.shape == (2, len(CLASSES), SIZE, SIZE)


def test_evaluation_of_a_torchscript_classifier_skips_grad_cam_with_the_reason(tmp_path):
    """RISE needs F as a function only and runs; Grad-CAM needs a layer's activations, which a TorchScript
    file does not hand out: skipped, the reason in metrics.json, the summary and the report."""
    import hashlib

    from conftest import explainer_state

    from pipeline.checkpoint import save_checkpoint
    from pipeline.config import Config
    from pipeline.data.classes import SYNTHETIC_CLASSES
    from pipeline.evaluate.evaluate import evaluate

    _synthetic(tmp_path, 8, 3, "test", shard_size=8)
    script = save_torchscript(tiny(len(SYNTHETIC_CLASSES)), tmp_path / "f.pt")
    record = {
        "uri": str(script),
        "sha256": hashlib.sha256(script.read_bytes()).hexdigest(),
        "form": "torchscript",
        "interface": {"classes": SYNTHETIC_CLASSES, "output": "sigmoid", "mean": list(MEAN), "std": list(STD)},
    }
    state = explainer_state(SYNTHETIC_CLASSES, SIZE, str(script), record["sha256"], explanandum=record)
    save_checkpoint(state, str(tmp_path / "explainer.pt"))
    config = Config.model_validate(
        {
            "data": {"test": str(tmp_path / "data" / "test"), "loader_workers": 0},
            "explainer": {"checkpoint": str(tmp_path / "explainer.pt")},
            "output": str(tmp_path / "out"),
            "evaluate": {
                "methods": ["explainer", "grad_cam", "rise"],
                "rise_masks": 16,
                "rise_batch_size": 16,
                "faithfulness_images": 0,
                "overlay_images": 0,
            },
        }
    )
    summary = evaluate(config, progress=False)
    metrics = json.loads(Path(summary["metrics"]).read_text())
    assert "TorchScript file" in metrics["methods"]["grad_cam"]["skipped"]
    assert summary["table"]["grad_cam"] == metrics["methods"]["grad_cam"]
    assert 0 <= metrics["methods"]["rise"]["cont_iou"] <= 1 and 0 <= metrics["methods"]["explainer"]["cont_iou"] <= 1
    assert "Grad-CAM was not run: the classifier is a TorchScript file" in Path(summary["report"]).read_text()
    # the sanity check retrains the classifier: it needs one wysiwyc can rebuild, and says so before any work
    from pipeline.workflows.sanity import run_sanity

    config.data.train = config.data.test
    with pytest.raises(WysiwycError, match=r"sanity: the classifier .* is a torchscript model; .* re-initialise"):
        run_sanity(config, progress=False)


def _readme_forms() -> list[list[str]]:
    """The command lines of the README's "Explain your own classifier" block, as argument lists."""
    import re

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Explain your own classifier", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```\n(.*?)```", section, flags=re.S)[0]
    return [line.split("#")[0].split()[1:] for line in block.splitlines() if line.startswith("wysiwyc ")]


def test_the_readme_command_line_of_every_form_trains_an_explainer(forms, tmp_path, s3_server, s3_bucket, s3_env):
    """Each README line runs as written, with the README's files replaced by ours (the same forms, each with its
    sidecar or metadata) and a tiny schedule: the Explainer records the form it explains."""
    import mlflow
    import mlflow.pytorch
    from conftest import classifier_state, cli

    from pipeline.checkpoint import save_checkpoint
    from pipeline.data.classes import SYNTHETIC_CLASSES

    classes = SYNTHETIC_CLASSES
    _synthetic(tmp_path, 32, 5, "train")
    net = tiny(len(classes))
    save_checkpoint(classifier_state(classes, SIZE), str(tmp_path / "best.pt"))
    for name in ("mine.pt2", "mine_script.pt", "mine.pth"):
        sidecar(tmp_path / name, classes, "sigmoid")
    save_export(net, tmp_path / "mine.pt2", SIZE)
    storage.write_bytes(f"s3://{s3_bucket}/mine.pt2", (tmp_path / "mine.pt2").read_bytes(), s3_server.opts)
    storage.write_bytes(f"s3://{s3_bucket}/mine.json", (tmp_path / "mine.json").read_bytes(), s3_server.opts)
    save_torchscript(net, tmp_path / "mine_script.pt")
    torch.save(resnet18(len(classes)).state_dict(), tmp_path / "mine.pth")
    interface = {"classes": classes, "output": "sigmoid", "mean": list(MEAN), "std": list(STD)}
    registry = _registry(tmp_path, {"mine": (net, {})}, interface)
    mlflow.MlflowClient(registry, registry).set_registered_model_alias("mine", "champion", "1")
    ours = {
        "explanandum.model=runs/checkpoints/cpu-classifier/best.pt": f"explanandum.model={tmp_path / 'best.pt'}",
        "explanandum.model=s3://models/mine.pt2": f"explanandum.model=s3://{s3_bucket}/mine.pt2",
        "explanandum.model=mine_script.pt": f"explanandum.model={tmp_path / 'mine_script.pt'}",
        "explanandum.weights=mine.pth": f"explanandum.weights={tmp_path / 'mine.pth'}",
    }
    tiny_run = [
        f"data.train={tmp_path / 'data'}/train",
        "data.val=",
        f"data.image_size={SIZE}",
        "data.loader_workers=0",
        "data.shuffle_buffer=16",
        "trainer.batch_size=16",
        "trainer.epochs=1",
        "trainer.num_workers=1",
        "trainer.backend=local",
        f"trainer.storage={tmp_path / 'ckpt'}",
        f"tracking.uri={registry}",
        "tracking.enabled=false",
        "explainer.init=scratch",
        "--json",
    ]
    lines = _readme_forms()
    expected = ["wysiwyc", "export", "torchscript", "export", "torchvision"]
    assert len(lines) == len(expected)
    for i, (line, form) in enumerate(zip(lines, expected)):
        args = [ours.get(a, a) for a in line]
        summary = json.loads(cli(*args, *tiny_run, f"trainer.run_name=form{i}").stdout)
        record = torch.load(summary["checkpoint"], weights_only=True)["explanandum"]
        assert record["form"] == form, line
    assert record["arch"] == "torchvision:resnet18"


def test_classes_chosen_by_the_explainers_own_class_head_call_no_classifier(forms):
    """attribute.class_source=explainer: the distilled Explainer's class head gives the probabilities (with F's
    output activation), and F is not called; an Explainer without a class head is refused."""
    from pipeline.models.explainer import build_explainer
    from pipeline.models.predictor import Predictor

    f = load_classifier(_cfg(model=str(forms["export"]), output=None))
    calls = []
    original = f.module
    f.module = lambda x: calls.append(1) or original(x)

    def predictor(explainer):
        return Predictor(explainer.eval(), f, CLASSES, SIZE, "e.pt", "0" * 64, f.uri, f.sha256)

    torch.manual_seed(0)
    with_head = build_explainer("compact", len(CLASSES), levels=2, cam=True)
    p = predictor(with_head).choose_classes_with("explainer")
    x = _x(2)
    out = p(x)
    assert not calls
    torch.testing.assert_close(out.probs, torch.sigmoid(with_head.class_logits(x)))
    assert predictor(with_head)(x).probs.shape == (2, 3) and calls  # the default asks F
    with pytest.raises(WysiwycError, match="has no class head"):
        predictor(build_explainer("compact", len(CLASSES), levels=2)).choose_classes_with("explainer")
