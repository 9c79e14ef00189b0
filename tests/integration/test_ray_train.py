"""Ray Train on a local Ray (2 CPU workers, DDP over gloo), shards and checkpoints in a real SeaweedFS,
tracked by a real ``mlflow server`` (sqlite backend, artifacts in the same SeaweedFS).

One Ray session and one MLflow server for the whole module (Ray start-up and a worker group cost
~20 s each); the tests share the classifier the first one trains.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import environ

from pipeline import checkpoint as ckpt
from pipeline.config import IngestConfig, load_config
from pipeline.data.ingest import ingest
from pipeline.data.synthetic import SyntheticReader
from pipeline.stack import MLflowServer

pytestmark = pytest.mark.s3

SIZE = 32
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stack(s3_server, mlflow_server, session_stack, ray_cluster, tmp_path_factory):
    """Bucket with train/val shards, the MLflow server, and the session's Ray."""
    root = tmp_path_factory.mktemp("raytrain")
    bucket = s3_server.make_bucket("raytrain")
    env = {**s3_server.env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    for split, n, seed in (("train", 64, 0), ("val", 32, 1)):
        ingest(
            SyntheticReader(n, seed, split, image_size=SIZE),
            f"s3://{bucket}/data",
            split,
            IngestConfig(workers=1, shard_size=8),
            opts=s3_server.opts,
            progress=False,
        )
    with environ(env):
        yield {
            "bucket": bucket,
            "uri": mlflow_server.uri,
            "artifacts": session_stack.bucket,  # the MLflow server keeps artifacts in s3://ARTIFACTS/mlflow
            "root": root,
            "s3": s3_server,
            "gcs": ray_cluster,
        }


def overrides(stack, *extra):
    b = stack["bucket"]
    return [
        f"data.train=s3://{b}/data/train",
        f"data.val=s3://{b}/data/val",
        f"data.image_size={SIZE}",
        "data.loader_workers=0",
        "data.shuffle_buffer=16",
        "trainer.batch_size=8",
        "trainer.num_workers=2",
        f"trainer.storage=s3://{b}/runs",
        "optim.lr=0.003",
        f"tracking.uri={stack['uri']}",
        "tracking.experiment=ray-tests",
        "tracking.overlay_images=4",
        *extra,
    ]


def _client(stack):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=stack["uri"])


def _keys(stack, prefix):
    listing = stack["s3"].client().list_objects_v2(Bucket=stack["bucket"], Prefix=prefix)
    return [o["Key"] for o in listing.get("Contents", [])]


@pytest.fixture(scope="module")
def classifier(stack):
    from pipeline.train.launch import train_classifier

    config = load_config(None, overrides(stack, "trainer.epochs=3", "trainer.run_name=clf"))
    return train_classifier(config)


def test_two_worker_classifier_lowers_the_loss_and_is_tracked_in_mlflow(stack, classifier):
    final = classifier["final"]
    history = json.loads(
        stack["s3"].client().get_object(Bucket=stack["bucket"], Key="runs/clf/history.json")["Body"].read()
    )
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # 64 samples in 8 shards over 2 ranks × batch 8: 4 steps per epoch on each rank
    assert classifier["steps"] == 3 * 4 and final["images_per_second"] > 0
    # the best checkpoint is an object in the bucket and loads with weights_only
    assert classifier["checkpoint"].startswith(f"s3://{stack['bucket']}/runs/clf/checkpoint_")
    state, _ = ckpt.load_checkpoint(classifier["checkpoint"], stack["s3"].opts)
    assert state["kind"] == "classifier" and state["mlflow_run_id"] == classifier["mlflow_run_id"]
    alias, _ = ckpt.load_checkpoint(f"s3://{stack['bucket']}/runs/clf/best.pt", stack["s3"].opts)
    assert alias["epoch"] == state["epoch"]  # RUN/best.pt: the stable URI of the best checkpoint
    run = _client(stack).get_run(classifier["mlflow_run_id"])
    assert run.info.run_name == "clf" and run.info.status == "FINISHED"
    assert run.data.params["loss.entropy_regularizer"] == "1.0"
    assert run.data.params["trainer.num_workers"] == "2"
    assert {"train_loss", "val_loss", "val_f1", "images_per_second", "data_wait_share", "step/loss"} <= set(
        run.data.metrics
    )
    assert run.data.tags["best_checkpoint"] == classifier["checkpoint"]
    digests = {i.dataset.digest for i in run.inputs.dataset_inputs}
    assert len(digests) == 2  # train and val manifests


def test_two_worker_explainer_logs_every_loss_term_and_the_mask_overlay(stack, classifier):
    from pipeline.train.launch import train_explainer

    config = load_config(
        None,
        overrides(
            stack,
            "trainer.epochs=2",
            "trainer.run_name=exp",
            f"explanandum.checkpoint={classifier['checkpoint']}",
            "loss.entropy_regularizer=0.5",
        ),
    )
    summary = train_explainer(config)
    client = _client(stack)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["loss.entropy_regularizer"] == "0.5"
    assert run.data.params["loss.ncmask_total_area_regularizer"] == "0.3"
    for term in ("classification", "entropy", "tv", "area_constraint", "mask_area", "ncmask_area"):
        assert f"step/{term}" in run.data.metrics and f"train_{term}" in run.data.metrics
    steps = client.get_metric_history(run.info.run_id, "step/loss")
    assert len(steps) == summary["steps"] == 2 * 4
    overlays = [a.path for a in client.list_artifacts(run.info.run_id, "overlays")]
    assert overlays == ["overlays/epoch_001.png", "overlays/epoch_002.png"]
    png = client.download_artifacts(run.info.run_id, "overlays/epoch_002.png", str(stack["root"]))
    assert Path(png).read_bytes()[:4] == b"\x89PNG"
    stored = _keys({**stack, "bucket": stack["artifacts"]}, f"mlflow/{run.info.experiment_id}/{run.info.run_id}/")
    assert any(k.endswith("/overlays/epoch_002.png") for k in stored), stored


@pytest.mark.slow  # minutes: a kill and a relaunch (`make test-slow`)
def test_killed_run_resumes_at_the_saved_step(stack):
    args = overrides(stack, "trainer.epochs=40", "trainer.run_name=killed")
    env = {**os.environ, "RAY_ADDRESS": stack["gcs"]}
    proc = subprocess.Popen(
        [str(BIN / "wysiwyc"), "train", "classifier", *args, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    snapshot = "runs/killed/checkpoint_manager_snapshot.json"  # Ray's record of the reported checkpoints

    def latest():
        if snapshot not in _keys(stack, "runs/killed/"):
            return None
        body = stack["s3"].client().get_object(Bucket=stack["bucket"], Key=snapshot)["Body"].read()
        return json.loads(body).get("latest_checkpoint_result")

    deadline = time.monotonic() + 180
    try:
        while latest() is None:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; Ray tears down its job's workers
        proc.wait()
    time.sleep(2)  # a snapshot write in flight may still land
    saved = latest()
    epochs_done, step = int(saved["metrics"]["epoch"]), int(saved["metrics"]["step"])
    state, _ = ckpt.load_checkpoint(
        f"s3://{stack['bucket']}/runs/killed/{saved['checkpoint_dir_name']}/checkpoint.pt", stack["s3"].opts
    )
    assert state["step"] == step and epochs_done < 40  # killed long before the end
    mlflow_run_id = state["mlflow_run_id"]

    from pipeline.train.launch import train_classifier

    summary = train_classifier(
        load_config(None, overrides(stack, f"trainer.epochs={epochs_done + 1}", "trainer.run_name=killed"))
    )
    assert summary["resumed_from_epoch"] == epochs_done
    assert summary["steps"] == step + 4  # one more epoch, not a fresh start
    assert summary["mlflow_run_id"] == mlflow_run_id  # the same MLflow run continues


def test_two_workers_see_disjoint_shards(stack):
    import ray.train
    from ray.train.torch import TorchTrainer

    out = stack["root"] / "shards"
    out.mkdir()

    # defined here so that cloudpickle ships it by value: Ray workers cannot import this test module
    def _shard_keys(payload):
        import json
        from pathlib import Path

        import ray.train

        from pipeline.data.shards import ShardDataset

        context = ray.train.get_context()
        dataset = ShardDataset(
            payload["spec"],
            image_size=32,
            train=True,
            shuffle_buffer=0,
            rank=context.get_world_rank(),
            world_size=context.get_world_size(),
            opts=None,
        )
        keys = [s["key"] for s in dataset]
        Path(payload["out"], f"rank{context.get_world_rank()}.json").write_text(json.dumps(keys))

    TorchTrainer(
        _shard_keys,
        train_loop_config={"spec": f"s3://{stack['bucket']}/data/train", "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(name="shards", storage_path=str(stack["root"] / "ray-runs")),
    ).fit()
    a, b = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    assert a and b and not set(a) & set(b) and len(a) + len(b) == 64


@pytest.mark.slow  # minutes: a worker group failed and restarted from its checkpoint (`make test-slow`)
def test_failed_worker_group_restarts_from_the_latest_checkpoint(stack):
    from pipeline.train.distributed import fit_ray

    marker = stack["root"] / "failed-once"

    # defined here so that cloudpickle ships it by value: Ray workers cannot import this test module
    def fail_once_at_epoch_2(epoch, rank, marker=str(marker)):
        import os
        import time

        if epoch == 1 and rank == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            # Ray Train's controller registers a reported checkpoint when it next polls the workers: a
            # crash right after report() can beat it under load (one CI run then resumed from scratch)
            time.sleep(5)
            raise RuntimeError("injected worker failure at epoch 2")

    config = load_config(
        None,
        overrides(
            stack, "trainer.epochs=3", "trainer.run_name=flaky", "trainer.max_failures=1", "tracking.overlay_images=0"
        ),
    )
    summary = fit_ray("classifier", config, on_epoch_start=fail_once_at_epoch_2)
    assert marker.exists()  # the failure did happen
    # the restarted worker group resumed after epoch 1 (its checkpoint), not from scratch
    assert summary["resumed_from_epoch"] == 1
    assert summary["epochs"] == 3 and summary["steps"] == 3 * 4
    history = json.loads(
        stack["s3"].client().get_object(Bucket=stack["bucket"], Key="runs/flaky/history.json")["Body"].read()
    )
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["step"] for h in history] == [4, 8, 12]
    state, _ = ckpt.load_checkpoint(summary["checkpoint"], stack["s3"].opts)
    assert state["mlflow_run_id"] == summary["mlflow_run_id"]  # the same MLflow run continued
    assert _client(stack).get_run(summary["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.slow  # minutes: the tracking server killed mid-run and started again (`make test-slow`)
def test_tracking_outage_costs_no_epoch_and_the_records_arrive_after_the_server_returns(stack, classifier):
    """The MLflow server is SIGKILLed after epoch 1 of 3: training finishes every epoch within a bound and
    exits cleanly; relaunching the finished run once the server is back sends what waited."""
    from mlflow.tracking import MlflowClient

    from pipeline.train.distributed import fit_ray

    root = stack["root"] / "mlflow-outage"
    server = MLflowServer(root, stack["bucket"], s3_env=stack["s3"].env).start()
    killed_at = stack["root"] / "mlflow-killed-at"

    # defined here so that cloudpickle ships it by value: Ray workers cannot import this test module
    def kill_tracking_at_epoch_2(epoch, rank, pid=server.record["pid"], out=str(killed_at)):
        import os
        import signal
        import time

        if epoch == 1 and rank == 0:
            os.killpg(pid, signal.SIGKILL)  # the server's whole session: no goodbye, port closed
            open(out, "w").write(str(time.time()))

    args = overrides(
        stack,
        "trainer.epochs=3",
        "trainer.run_name=outage",
        "trainer.keep_checkpoints=3",
        f"explanandum.checkpoint={classifier['checkpoint']}",
        f"tracking.uri={server.uri}",
    )
    try:
        first = fit_ray("explainer", load_config(None, args), on_epoch_start=kill_tracking_at_epoch_2)
        extra = time.time() - float(killed_at.read_text())
        assert first["epochs"] == 3 and first["steps"] == 3 * 4
        assert extra < 120, f"training took {extra:.0f} s after the server died"
        # every epoch's checkpoint was saved (none lost to tracking)
        saved = sorted(
            {k.split("/")[2] for k in _keys(stack, "runs/outage/checkpoint_") if k.endswith("/checkpoint.pt")}
        )
        assert [
            ckpt.load_checkpoint(f"s3://{stack['bucket']}/runs/outage/{d}/checkpoint.pt", stack["s3"].opts)[0]["epoch"]
            for d in saved
        ] == [0, 1, 2]
        history = json.loads(
            stack["s3"].client().get_object(Bucket=stack["bucket"], Key="runs/outage/history.json")["Body"].read()
        )
        assert [h["epoch"] for h in history] == [1, 2, 3]
        pending = json.loads(
            stack["s3"]
            .client()
            .get_object(Bucket=stack["bucket"], Key="runs/outage/tracking_pending.json")["Body"]
            .read()
        )
        assert pending["run_id"] == first["mlflow_run_id"]
        kinds = [op["op"] for op in pending["ops"]]
        assert "metrics" in kinds and "artifact" in kinds and kinds.count("status") == 1 and kinds[-1] == "tags"

        # the server comes back on the same port and store; launching the finished run again sends the records
        server = MLflowServer(root, stack["bucket"], port=server.port, s3_env=stack["s3"].env).start()
        client = MlflowClient(server.uri, registry_uri=server.uri)
        assert client.get_run(first["mlflow_run_id"]).info.status == "RUNNING"  # what the outage left
        assert [m.step for m in client.get_metric_history(first["mlflow_run_id"], "train_loss")] == [4]
        again = fit_ray("explainer", load_config(None, args))
        assert again["mlflow_run_id"] == first["mlflow_run_id"] and again["epochs"] == 3
        run = client.get_run(first["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [4, 8, 12]
        assert len(client.get_metric_history(run.info.run_id, "step/loss")) == 12
        overlays = [a.path for a in client.list_artifacts(run.info.run_id, "overlays")]
        assert overlays == ["overlays/epoch_001.png", "overlays/epoch_002.png", "overlays/epoch_003.png"]
        assert run.data.tags["best_checkpoint"] == again["checkpoint"]
        pending = json.loads(
            stack["s3"]
            .client()
            .get_object(Bucket=stack["bucket"], Key="runs/outage/tracking_pending.json")["Body"]
            .read()
        )
        assert pending["ops"] == []
    finally:
        server.stop()
