"""Training stages on CPU: the loss goes down, checkpoints are plain and resumable, bad input is clear."""

import json
import math

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.config import IngestConfig, load_config
from pipeline.data.ingest import ingest
from pipeline.data.synthetic import SyntheticReader
from pipeline.errors import WysiwycError
from pipeline.models.predictor import explainer_from_checkpoint
from pipeline.train.trainer import fit, run_name

SIZE = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for split, n, seed in (("train", 96, 0), ("val", 32, 1)):
        ingest(
            SyntheticReader(n, seed, split, image_size=SIZE),
            str(root),
            split,
            IngestConfig(workers=1, shard_size=16),
            progress=False,
        )
    return root


def config(data, tmp_path, *extra):
    return load_config(
        None,
        [
            f"data.train={data}/train",
            f"data.val={data}/val",
            f"data.image_size={SIZE}",
            "data.loader_workers=0",
            "data.shuffle_buffer=32",
            "trainer.batch_size=16",
            f"trainer.storage={tmp_path}/ckpt",
            "optim.lr=0.003",
            "trainer.backend=local",
            "tracking.enabled=false",
            *extra,
        ],
    )


def test_classifier_training_lowers_the_loss_and_writes_a_plain_checkpoint(data, tmp_path):
    torch.manual_seed(0)
    summary = fit("classifier", config(data, tmp_path, "trainer.epochs=4", "trainer.run_name=clf"), progress=False)
    history = json.loads((tmp_path / "ckpt" / "clf" / "history.json").read_text())
    assert len(history) == 4 and summary["epochs"] == 4 and summary["steps"] == 4 * 6
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    state, _ = ckpt.load_checkpoint(summary["checkpoint"])  # weights_only load
    assert state["kind"] == "classifier" and state["arch"] == "small_cnn" and state["classes"][0] == "circle"
    assert set(state) >= {"model", "optimizer", "epoch", "step", "config", "metrics"}


def test_explainer_training_lowers_the_loss_and_leaves_the_explanandum_untouched(data, tmp_path):
    clf = fit("classifier", config(data, tmp_path, "trainer.epochs=1", "trainer.run_name=clf"), progress=False)
    before = ckpt.load_checkpoint(clf["checkpoint"])[0]["model"]
    summary = fit(
        "explainer",
        config(
            data, tmp_path, "trainer.epochs=3", "trainer.run_name=exp", f"explanandum.checkpoint={clf['checkpoint']}"
        ),
        progress=False,
    )
    history = json.loads((tmp_path / "ckpt" / "exp" / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert {
        "train_classification",
        "train_entropy",
        "train_tv",
        "train_area_constraint",
        "train_mask_area",
        "train_ncmask_area",
        "val_loss",
        "val_f1",
    } <= set(history[-1])
    state, _ = ckpt.load_checkpoint(summary["checkpoint"])
    assert state["kind"] == "explainer" and state["explanandum"]["sha256"] == ckpt.load_checkpoint(clf["checkpoint"])[1]
    after = ckpt.load_checkpoint(clf["checkpoint"])[0]["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included


def test_channels_last_on_cpu_trains_the_same_explainer_and_levels_and_branch_reach_the_checkpoint(data, tmp_path):
    clf = fit("classifier", config(data, tmp_path, "trainer.epochs=1", "trainer.run_name=clf"), progress=False)
    histories = {}
    for fmt in ("true", "false"):
        summary = fit(
            "explainer",
            config(
                data,
                tmp_path,
                "trainer.epochs=1",
                f"trainer.run_name=exp-{fmt}",
                f"trainer.channels_last={fmt}",
                "explainer.arch=compact",
                "explainer.levels=3",
                f"explanandum.checkpoint={clf['checkpoint']}",
            ),
            progress=False,
        )
        histories[fmt] = json.loads((tmp_path / "ckpt" / f"exp-{fmt}" / "history.json").read_text())[-1]
        model, state, _ = explainer_from_checkpoint(summary["checkpoint"])
        assert len(model.blocks) == 3 and state["config"]["explainer"]["levels"] == 3
        assert model.cam_channels is None
    # the memory format changes the convolution kernels, not the maths: the epoch's losses agree to
    # rounding; the validation loss after six Adam steps (which amplify rounding early on) to 2%
    for key in ("train_loss", "train_classification", "train_mask_area"):
        assert histories["true"][key] == pytest.approx(histories["false"][key], rel=1e-3, abs=1e-5), key
    assert histories["true"]["val_loss"] == pytest.approx(histories["false"]["val_loss"], rel=2e-2)
    summary = fit(
        "explainer",
        config(
            data,
            tmp_path,
            "trainer.epochs=1",
            "trainer.run_name=exp-cam",
            "explainer.arch=compact",
            "explainer.levels=3",
            "explainer.cam=true",
            f"explanandum.checkpoint={clf['checkpoint']}",
        ),
        progress=False,
    )
    model, state, _ = explainer_from_checkpoint(summary["checkpoint"])
    assert model.cam_channels == (128,) and state["config"]["explainer"]["cam"] is True


def test_cpu_amp_bf16_runs_the_steps_under_bf16_autocast_and_keeps_float32_weights(data, tmp_path):
    from pipeline.models.explanandum import SmallCNN
    from pipeline.train.trainer import step_context

    cpu = torch.device("cpu")
    assert step_context(config(data, tmp_path).trainer, cpu).amp_dtype is None  # the default: fp32 on the CPU
    ctx = step_context(config(data, tmp_path, "trainer.cpu_amp=bf16").trainer, cpu)
    with ctx.autocast():
        assert SmallCNN(3)(torch.randn(2, 3, SIZE, SIZE)).dtype == torch.bfloat16
    # auto: bf16 where the CPU flags say native bf16
    from pipeline.train.trainer import cpu_has_native_bf16

    flags = tmp_path / "cpuinfo"
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n")
    assert cpu_has_native_bf16(str(flags)) is True
    flags.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f\n")
    assert cpu_has_native_bf16(str(flags)) is False and cpu_has_native_bf16(str(tmp_path / "absent")) is False
    auto = step_context(config(data, tmp_path, "trainer.cpu_amp=auto").trainer, cpu).amp_dtype
    assert auto is (torch.bfloat16 if cpu_has_native_bf16() else None)
    # on a GPU, trainer.amp decides and cpu_amp is not read
    gpu = step_context(config(data, tmp_path, "trainer.amp=bf16").trainer, torch.device("cuda"))
    assert gpu.amp_dtype is torch.bfloat16
    torch.manual_seed(0)
    clf = fit(
        "classifier",
        config(data, tmp_path, "trainer.epochs=3", "trainer.run_name=clf-bf16", "trainer.cpu_amp=bf16"),
        progress=False,
    )
    history = json.loads((tmp_path / "ckpt" / "clf-bf16" / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    summary = fit(
        "explainer",
        config(
            data,
            tmp_path,
            "trainer.epochs=2",
            "trainer.run_name=exp-bf16",
            "trainer.cpu_amp=bf16",
            f"explanandum.checkpoint={clf['checkpoint']}",
        ),
        progress=False,
    )
    history = json.loads((tmp_path / "ckpt" / "exp-bf16" / "history.json").read_text())
    assert all(math.isfinite(r[k]) for r in history for k in ("train_loss", "val_loss", "val_c_iou"))
    state, _ = ckpt.load_checkpoint(summary["checkpoint"])
    assert {v.dtype for v in state["model"].values() if v.is_floating_point()} == {torch.float32}


def test_relaunching_the_same_run_resumes_from_the_last_epoch(data, tmp_path):
    first = fit("classifier", config(data, tmp_path, "trainer.epochs=2", "trainer.run_name=r"), progress=False)
    assert first["resumed_from_epoch"] is None
    state1, _ = ckpt.load_checkpoint(str(tmp_path / "ckpt" / "r" / "last.pt"))
    second = fit("classifier", config(data, tmp_path, "trainer.epochs=3", "trainer.run_name=r"), progress=False)
    assert second["resumed_from_epoch"] == 2 and second["epochs"] == 3
    assert second["steps"] == first["steps"] + 6  # one more epoch of 96/16 steps, not three
    history = json.loads((tmp_path / "ckpt" / "r" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert state1["optimizer"]["state"]  # Adam moments were saved and restored


def test_local_run_is_tracked_in_the_embedded_sqlite_mlflow_store(data, tmp_path):
    from mlflow.tracking import MlflowClient

    summary = fit(
        "classifier",
        config(data, tmp_path, "trainer.run_name=tracked", "tracking.enabled=true", "trainer.max_steps=3"),
        progress=False,
    )
    db = tmp_path / "ckpt" / "mlflow.db"  # one store for every run under trainer.storage
    assert db.is_file() and summary["mlflow_run_id"]
    run = MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(summary["mlflow_run_id"])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["loss.entropy_regularizer"] == "1.0" and run.data.params["optim.lr"] == "0.003"
    assert {"train_loss", "images_per_second", "data_wait_share", "step/loss", "val_f1"} <= set(run.data.metrics)
    assert run.data.tags["best_checkpoint"] == summary["checkpoint"]
    assert run.inputs.dataset_inputs[0].dataset.digest


def test_run_name_is_deterministic_for_the_same_config(data, tmp_path):
    a, b = config(data, tmp_path), config(data, tmp_path)
    assert run_name("classifier", a) == run_name("classifier", b)
    assert run_name("classifier", a) != run_name("classifier", config(data, tmp_path, "optim.lr=0.01"))


def test_early_stopping_stops_when_validation_stops_improving(data, tmp_path):
    summary = fit(
        "classifier",
        config(
            data, tmp_path, "trainer.epochs=30", "trainer.patience=1", "trainer.min_delta=10", "trainer.run_name=es"
        ),
        progress=False,
    )
    assert summary["stopped_early"] and summary["epochs"] == 2


def test_explainer_without_explanandum_or_with_wrong_checkpoint_is_clear(data, tmp_path):
    with pytest.raises(WysiwycError, match="explanandum.model is not set"):
        fit("explainer", config(data, tmp_path), progress=False)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WysiwycError, match="bad.pt is not a wysiwyc checkpoint: it is a text file"):
        fit("explainer", config(data, tmp_path, f"explanandum.checkpoint={bad}"), progress=False)
    with pytest.raises(WysiwycError, match="does not exist"):
        fit("explainer", config(data, tmp_path, f"explanandum.checkpoint={tmp_path}/none.pt"), progress=False)


class Evil:
    """A pickle gadget: unpickling it calls print (a stand-in for arbitrary code)."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": ckpt.FORMAT, "kind": "classifier", "x": Evil()}, path)
    with pytest.raises(WysiwycError, match="evil.pt is not a wysiwyc checkpoint: it holds a Python object"):
        ckpt.load_checkpoint(str(path))


def test_a_checkpoint_whose_bytes_changed_after_it_was_written_is_refused(tmp_path):
    path = tmp_path / "best.pt"
    weights = torch.arange(64, dtype=torch.float32)
    digest = ckpt.save_checkpoint({"kind": "classifier", "model": {"w": weights}}, str(path))
    assert (tmp_path / "best.pt.sha256").read_text() == f"{digest}  best.pt\n"  # sha256sum's format
    state, loaded = ckpt.load_checkpoint(str(path))
    assert loaded == digest and torch.equal(state["model"]["w"], weights)
    # one tensor byte altered: torch.load alone reads the changed value without a word
    data = bytearray(path.read_bytes())
    offset = bytes(data).index(weights[1:].numpy().tobytes())
    data[offset + 3] ^= 0x40
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], weights)
    with pytest.raises(WysiwycError, match=r"checkpoint .*best.pt: its sha256 is \w+ but best.pt.sha256 beside it "):
        ckpt.load_checkpoint(str(path))
    # a checkpoint without a record (older, or copied by hand) loads as it is
    (tmp_path / "best.pt.sha256").unlink()
    assert ckpt.load_checkpoint(str(path))[1] != digest


# ---------------------------------------------------------------- two DDP ranks, one validation shard


def _rank_main(rank: int, world: int, store: str, overrides: list[str], out: str) -> None:
    """One rank of a gloo process group running the worker loop (forked: no Ray needed)."""
    import os
    import traceback

    import torch.distributed as dist

    code = 1
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        summary = fit("classifier", load_config(None, overrides), rank=rank, world=world, progress=False)
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(summary, fh)
        dist.destroy_process_group()
        code = 0
    except BaseException:
        with open(f"{out}.{rank}", "w") as fh:
            fh.write(traceback.format_exc())
    finally:
        os._exit(code)


def test_validation_split_with_fewer_shards_than_ranks_gives_the_single_rank_metrics(tmp_path):
    import multiprocessing

    from pipeline.data.shards import ShardDataset, make_loader
    from pipeline.train.steps import StepContext, classifier_loss_fn, evaluate_epoch
    from pipeline.train.trainer import _build

    ingest(
        SyntheticReader(64, 0, "train", image_size=SIZE),
        str(tmp_path / "d"),
        "train",
        IngestConfig(workers=1, shard_size=16),
        progress=False,
    )  # 4 shards: 2 per rank
    ingest(
        SyntheticReader(24, 1, "val", image_size=SIZE),
        str(tmp_path / "d"),
        "val",
        IngestConfig(workers=1, shard_size=64),
        progress=False,
    )  # 1 shard for 2 ranks
    val = str(tmp_path / "d" / "val")
    # the training split keeps the strict check; validation allows ranks without shards
    with pytest.raises(WysiwycError, match="1 shard"):
        ShardDataset(val, image_size=SIZE, train=False, rank=0, world_size=2)
    assert list(ShardDataset(val, image_size=SIZE, train=False, rank=1, world_size=2, allow_idle_ranks=True)) == []

    overrides = [
        f"data.train={tmp_path}/d/train",
        f"data.val={val}",
        f"data.image_size={SIZE}",
        "data.loader_workers=0",
        "data.shuffle_buffer=0",
        "trainer.batch_size=8",
        "trainer.epochs=1",
        f"trainer.storage={tmp_path}/ckpt",
        "trainer.run_name=ddp",
        "trainer.backend=local",
        "tracking.enabled=false",
    ]
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_rank_main, args=(r, 2, str(tmp_path / "store"), overrides, str(tmp_path / "out")))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    outputs = [(tmp_path / f"out.{r}").read_text() if (tmp_path / f"out.{r}").exists() else "" for r in range(2)]
    assert [p.exitcode for p in procs] == [0, 0], outputs
    summary = json.loads(outputs[0])
    assert summary["steps"] == 4  # 32 training samples per rank, batch 8
    record = json.loads((tmp_path / "ckpt" / "ddp" / "history.json").read_text())[-1]

    # the same weights evaluated by one rank over the whole validation split
    state, _ = ckpt.load_checkpoint(str(tmp_path / "ckpt" / "ddp" / "last.pt"))
    cfg = load_config(None, overrides)
    model, _, _, _, _ = _build("classifier", cfg, state["classes"], torch.device("cpu"), None)
    model.load_state_dict(state["model"])
    step_ctx = StepContext()
    single = ShardDataset(val, image_size=SIZE, train=False, rank=0, world_size=1)
    expected = evaluate_epoch(
        classifier_loss_fn(model, step_ctx), [model], make_loader(single, 8, 0), step_ctx
    ).compute()
    assert {"val_loss", "val_accuracy", "val_f1"} <= set(record)
    for key in ("loss", "accuracy", "f1"):
        assert record[f"val_{key}"] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)


def _explanandum_tensors(checkpoint: str) -> list[torch.Tensor]:
    return [t for t in ckpt.load_checkpoint(checkpoint)[0]["model"].values() if t.is_floating_point() and t.numel() > 1]


@pytest.mark.parametrize(
    "init, extra, copies",
    [
        ("scratch", ["explainer.cam=true"], False),
        ("distilled", ["explainer.cam=true"], False),
        ("explanandum_copy", ["explainer.cam=true"], True),  # the white-box variant: the check can fail
    ],
)
def test_black_box_inits_start_from_no_tensor_of_the_explanandum(data, tmp_path, init, extra, copies):
    from pipeline.models.classifier import load_classifier
    from pipeline.train.trainer import _build

    clf = fit("classifier", config(data, tmp_path, "trainer.max_steps=2", "trainer.run_name=clf"), progress=False)
    cfg = config(
        data,
        tmp_path,
        f"explainer.init={init}",
        "explainer.arch=compact",
        "explainer.levels=3",
        *extra,
        f"explanandum.checkpoint={clf['checkpoint']}",
    )
    classes = ckpt.load_checkpoint(clf["checkpoint"])[0]["classes"]
    f = load_classifier(cfg.explanandum)
    model, _, _, extra_fields, distill = _build("explainer", cfg, classes, torch.device("cpu"), f)
    theirs = _explanandum_tensors(clf["checkpoint"])
    copied = [
        name
        for name, own in model.state_dict().items()
        if own.is_floating_point()
        and own.numel() > 1
        and any(own.shape == t.shape and torch.equal(own, t) for t in theirs)
    ]
    assert bool(copied) is copies, copied
    assert extra_fields["explainer_init"] == init and extra_fields["black_box"] is (not copies)
    assert (distill is not None) is (init == "distilled")


def test_distilled_init_distils_the_outputs_then_trains_the_papers_loss_calling_the_explanandum_only(
    data, tmp_path, monkeypatch
):
    from pipeline.models.explanandum import BlackBox
    from pipeline.train import trainer

    seen = []
    for name in ("distillation_loss_fn", "explainer_loss_fn"):
        original = getattr(trainer, name)

        def spy(model, explanandum, *args, _original=original, **kwargs):
            seen.append(explanandum)
            return _original(model, explanandum, *args, **kwargs)

        monkeypatch.setattr(trainer, name, spy)
    clf = fit("classifier", config(data, tmp_path, "trainer.epochs=2", "trainer.run_name=clf"), progress=False)
    cfg = [
        f"explanandum.checkpoint={clf['checkpoint']}",
        "trainer.run_name=dist",
        "explainer.init=distilled",  # the default Explainer's own class branch (resunet)
        "explainer.cam=true",
        "explainer.distill_epochs=2",
    ]
    summary = fit("explainer", config(data, tmp_path, "trainer.epochs=1", *cfg), progress=False)

    # the loss functions got the Explanandum as a black box: calling it works, anything else raises
    assert seen and all(isinstance(f, BlackBox) for f in seen)
    with pytest.raises(WysiwycError, match="black box.*not .parameters"):
        seen[0].parameters()
    history = json.loads((tmp_path / "ckpt" / "dist" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3] and summary["epochs"] == 3
    for h in history[:2]:  # distillation: its own metric names, F's outputs as targets
        assert {"distill_train_loss", "distill_train_prob_error", "distill_train_f1", "distill_val_loss"} <= set(h)
        assert "train_classification" not in h
    assert history[1]["distill_train_loss"] < history[0]["distill_train_loss"]
    assert {"train_classification", "train_entropy", "val_loss"} <= set(history[2])
    state, _ = ckpt.load_checkpoint(summary["checkpoint"])  # best.pt: only the paper's loss selects
    assert state["epoch"] == 2 and (state["explainer_init"], state["black_box"]) == ("distilled", True)
    # relaunched with one more epoch of the paper's loss, it resumes after the distillation
    again = fit("explainer", config(data, tmp_path, "trainer.epochs=2", *cfg), progress=False)
    assert again["resumed_from_epoch"] == 3 and again["epochs"] == 4


def test_rt_saliency_loss_kind_trains_the_same_explainer_with_dabkowski_and_gals_loss(data, tmp_path):
    torch.manual_seed(0)
    clf = fit("classifier", config(data, tmp_path, "trainer.epochs=1", "trainer.run_name=clf"), progress=False)
    summary = fit(
        "explainer",
        config(
            data,
            tmp_path,
            "trainer.epochs=3",
            "trainer.run_name=rt",
            "loss.kind=rt_saliency",
            f"explanandum.checkpoint={clf['checkpoint']}",
        ),
        progress=False,
    )
    history = json.loads((tmp_path / "ckpt" / "rt" / "history.json").read_text())
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    terms = {"train_preserver", "train_destroyer", "train_area", "train_tv", "train_mask_area", "val_loss", "val_f1"}
    assert terms <= set(history[-1])
    assert "train_entropy" not in history[-1]  # none of the paper's terms
    state, _ = ckpt.load_checkpoint(summary["checkpoint"])
    assert state["loss_kind"] == "rt_saliency" and state["arch"] == "resunet" and state["black_box"] is True
    # the paper's loss records its kind too
    assert ckpt.load_checkpoint(clf["checkpoint"])[0].get("loss_kind") is None  # a classifier has none
