"""λ sweeps on a real local Ray (Tune over Train V2), trials' checkpoints and Tune's state in a real
SeaweedFS, tracked by a real ``mlflow server`` (sqlite backend, artifacts in SeaweedFS).

The session's Ray; tiny trials (32 px synthetic shapes, 1 epoch, 1 worker each, two at a
time) from the CPU preset ``configs/cpu/sweep.yaml`` with overrides. The grid
sweep (2 trials at once, ~100 s on 2 cores, most of it Ray Train's worker-group start-up and teardown) runs in
`make test`; the killed-and-resumed sweep in the slow tier.
"""

from __future__ import annotations

import csv
import io
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

pytestmark = pytest.mark.s3

SIZE = 32
REPO = Path(__file__).resolve().parents[2]
# the base config's total-variation weight (not swept: every trial keeps it)
BASE_TV = load_config(REPO / "configs" / "cpu" / "explainer.yaml").loss.mask_variation_regularizer
PRESET = REPO / "configs" / "cpu" / "sweep.yaml"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def stack(s3_server, mlflow_server, ray_cluster, tmp_path_factory):
    """Local shards, a trained classifier, a bucket for the sweeps and the session's Ray."""
    root = tmp_path_factory.mktemp("sweep")
    bucket = s3_server.make_bucket("sweeps")
    env = {**s3_server.env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    for split, n, seed in (("train", 32, 0), ("val", 16, 1)):
        ingest(
            SyntheticReader(n, seed, split, image_size=SIZE),
            str(root / "data"),
            split,
            IngestConfig(workers=1, shard_size=8),
            progress=False,
        )
    from pipeline.train.launch import train_classifier

    classifier = train_classifier(
        load_config(
            None,
            [
                f"data.train={root}/data/train",
                f"data.image_size={SIZE}",
                "data.loader_workers=0",
                "trainer.backend=local",
                "trainer.epochs=2",
                "trainer.batch_size=8",
                "optim.lr=0.003",
                f"trainer.storage={root}/checkpoints",
                "trainer.run_name=clf",
                "tracking.enabled=false",
            ],
        )
    )

    # 2 trials at a time × (0.25 CPU for the trial + 1 for its worker): the session's Ray has 3 logical CPUs
    with environ(env):
        yield {
            "root": root,
            "bucket": bucket,
            "s3": s3_server,
            "mlflow": mlflow_server,
            "classifier": classifier["checkpoint"],
            "gcs": ray_cluster,
        }


def overrides(stack, name, *extra):
    root = stack["root"]
    return [
        f"sweep.name={name}",
        f"sweep.storage=s3://{stack['bucket']}/sweeps",
        f"data.train={root}/data/train",
        f"data.val={root}/data/val",
        f"data.image_size={SIZE}",
        "data.loader_workers=0",
        "data.shuffle_buffer=8",
        "trainer.batch_size=8",
        "trainer.epochs=1",
        "trainer.max_failures=0",
        "optim.lr=0.003",
        f"explanandum.checkpoint={stack['classifier']}",
        f"tracking.uri={stack['mlflow'].uri}",
        "tracking.experiment=sweep-tests",
        "tracking.overlay_images=0",
        *extra,
    ]


def _children(stack, parent_id):
    client = stack["mlflow"].client()
    experiment = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _object(stack, key) -> bytes:
    return stack["s3"].client().get_object(Bucket=stack["bucket"], Key=key)["Body"].read()


def _keys(stack, prefix):
    listing = stack["s3"].client().list_objects_v2(Bucket=stack["bucket"], Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_grid_sweep_under_asha_has_a_parent_run_a_child_run_per_trial_a_comparison_and_releases_the_workers(stack):
    import ray.util

    from pipeline.tune import load_sweep, read_sweep, run_sweep

    started = time.perf_counter()
    # a 2×1 grid (two keys: the product of their values) under ASHA: max_t=1 < trainer.epochs=2 stops each trial
    # after its first epoch; the two trials run at once (sweep.max_concurrent_trials=2)
    extra = (
        "sweep.space={loss.entropy_regularizer: {grid: [0.5, 2.0]},"
        " loss.mask_area_constraint_regularizer: {grid: [1.5]}}",
        "trainer.epochs=2",
        "sweep.scheduler=asha",
        "sweep.max_t=1",
    )
    summary = run_sweep(load_sweep(PRESET, overrides(stack, "grid", *extra)))
    seconds = time.perf_counter() - started
    print(f"2x1 grid sweep under ASHA: {seconds:.0f} s for 2 trials at once")
    assert summary["trials"] == {"finished": 2, "stopped": 0, "failed": 0}  # each used its budget: 1 epoch
    assert summary["run_name"] == summary["name"]  # the contract's key (`name` kept for earlier scripts)

    # one parent with the search space, a child per trial nested under it with the trial's λ values
    client = stack["mlflow"].client()
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.run_name == "grid" and parent.info.status == "FINISHED"
    assert parent.data.params["space.loss.entropy_regularizer"] == "grid [0.5, 2.0]"
    assert parent.data.params["space.loss.mask_area_constraint_regularizer"] == "grid [1.5]"
    assert parent.data.params["sweep.metric"] == "val_selection"
    children = _children(stack, parent.info.run_id)
    assert len(children) == 2
    grid = {
        (c.data.params["loss.entropy_regularizer"], c.data.params["loss.mask_area_constraint_regularizer"])
        for c in children
    }
    assert grid == {("0.5", "1.5"), ("2.0", "1.5")}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["loss.mask_variation_regularizer"] == str(BASE_TV)  # not swept: the base's
        m = child.data.metrics
        # the selection score is defined as masked-image F1 minus mean mask area (steps.py)
        assert m["val_selection"] == pytest.approx(m["val_f1"] - m["val_mask_area"], abs=1e-9)
        assert 0.0 <= m["val_c_iou"] <= 1.0 and 0.0 <= m["val_d_f1"] <= 1.0  # val has segmentation
        assert child.data.tags["wysiwyc.sweep"] == "grid"

    # sweep.json: two trials, the best is the trial with the highest val_selection
    record = read_sweep("grid", load_config(None, [f"sweep.storage=s3://{stack['bucket']}/sweeps"]))
    assert record["parent_run_id"] == parent.info.run_id and record["metric"] == "val_selection"
    assert len(record["trials"]) == 2
    top = max(record["trials"], key=lambda t: t["metrics"]["val_selection"])
    assert record["best"]["trial"] == top["trial"] and record["best"]["checkpoint"] == summary["checkpoint"]
    by_id = {c.info.run_id: c for c in children}
    best_child = by_id[record["best"]["mlflow_run_id"]]
    # the recorded score is the one the trial logged for the epoch ASHA took (a stopped trial may have logged
    # part of its next epoch before it stopped)
    logged = [m.value for m in client.get_metric_history(best_child.info.run_id, "val_selection")]
    assert top["metrics"]["val_selection"] == pytest.approx(logged[0])
    state, _ = ckpt.load_checkpoint(summary["checkpoint"], stack["s3"].opts)
    assert state["kind"] == "explainer"
    assert state["config"]["loss"]["entropy_regularizer"] == record["best"]["params"]["loss.entropy_regularizer"]
    assert parent.data.tags["best.checkpoint"] == summary["checkpoint"]
    assert parent.data.params["best.loss.entropy_regularizer"] == str(
        record["best"]["params"]["loss.entropy_regularizer"]
    )

    # the comparison table (a row per trial), the plot, next to sweep.json and in the parent run
    rows = list(csv.DictReader(io.StringIO(_object(stack, "sweeps/grid/table.csv").decode())))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
    assert {(r["loss.entropy_regularizer"], r["loss.mask_area_constraint_regularizer"]) for r in rows} == grid
    assert all(r["checkpoint"].startswith(f"s3://{stack['bucket']}/sweeps/grid/trials/grid-") for r in rows)
    assert _object(stack, "sweeps/grid/table.md").decode().count("| finished |") == 2
    assert _object(stack, "sweeps/grid/selection.png")[:4] == b"\x89PNG"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"table.md", "table.csv", "selection.png", "sweep.json"} <= artifacts

    # ASHA stopped every trial after one epoch, with its checkpoint; the stopped trials' TorchTrainer placement
    # groups (ids recorded by their rank 0) were released (Ray 2.60 keeps them otherwise)
    assert [t["epochs"] for t in record["trials"]] == [1, 1] and all(t["checkpoint"] for t in record["trials"])
    files = [k for k in _keys(stack, "sweeps/grid/trials/") if k.endswith("/placement_group")]
    ids = {_object(stack, k).decode().strip() for k in files}
    assert len(ids) == 2
    deadline = time.monotonic() + 60
    while live := [
        g
        for g in ray.util.placement_group_table().values()
        if g["placement_group_id"] in ids and g["state"] != "REMOVED"
    ]:
        assert time.monotonic() < deadline, live
        time.sleep(0.5)


@pytest.mark.slow  # minutes: a kill and a relaunch (`make test-slow`)
def test_failed_trial_is_recorded_and_a_killed_sweep_resumes_without_rerunning_finished_trials(stack):
    # class_mask_min_area 0.5 > class_mask_max_area 0.3: valid alone, the loss refuses it at the first step
    space = "sweep.space={loss.class_mask_min_area: {grid: [0.05, 0.5, 0.1]}}"
    args = overrides(stack, "resume", space)
    env = {**os.environ, "RAY_ADDRESS": stack["gcs"]}
    proc = subprocess.Popen(
        [str(BIN / "wysiwyc"), "sweep", "-c", str(PRESET), *args, "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 240
    try:
        while not (done := [k for k in _keys(stack, "sweeps/resume/trials/") if k.endswith("/trial.json")]):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no trial finished within 240 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver dies; Ray tears down its trials and workers
        proc.wait()
    assert not _keys(stack, "sweeps/resume/sweep.json")  # interrupted: not published
    finished = {k: _object(stack, k) for k in done}
    first = json.loads(next(iter(finished.values())))
    client = stack["mlflow"].client()
    before = client.get_run(first["mlflow_run_id"])
    checkpoints = _keys(stack, f"sweeps/resume/trials/{first['run_name']}/checkpoint_")

    from pipeline.errors import WysiwycError
    from pipeline.tune import read_sweep

    sweeps = load_config(None, [f"sweep.storage=s3://{stack['bucket']}/sweeps"])
    with pytest.raises(WysiwycError, match="unfinished"):
        read_sweep("resume", sweeps)
    # the same command again resumes; stdout holds nothing but the JSON summary
    again = subprocess.run(
        [str(BIN / "wysiwyc"), "sweep", "-c", str(PRESET), *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout)
    assert summary["trials"] == {"finished": 2, "stopped": 0, "failed": 1}

    record = read_sweep("resume", sweeps)
    by_value = {t["params"]["loss.class_mask_min_area"]: t for t in record["trials"]}
    assert by_value[0.5]["status"] == "failed" and "class_mask_min_area" in by_value[0.5]["error"]
    assert by_value[0.5]["checkpoint"] is None
    assert by_value[0.05]["status"] == by_value[0.1]["status"] == "finished"
    assert record["best"]["trial"] in (by_value[0.05]["trial"], by_value[0.1]["trial"])

    # the trial that had finished was not trained again: same files, same MLflow run, untouched
    for key, body in finished.items():
        assert _object(stack, key) == body
    assert _keys(stack, f"sweeps/resume/trials/{first['run_name']}/checkpoint_") == checkpoints
    after = client.get_run(first["mlflow_run_id"])
    assert after.info.end_time == before.info.end_time and after.info.status == "FINISHED"
    # one parent across both launches; one child per trial still open or finished, the failed one FAILED
    parents = client.search_runs(
        [after.info.experiment_id], filter_string="tags.`wysiwyc.sweep` = 'resume' and attributes.run_name = 'resume'"
    )
    assert [p.info.run_id for p in parents] == [record["parent_run_id"]] == [summary["mlflow_run_id"]]
    newest = {}  # per trial run: its latest child (a retried failed trial has one per attempt)
    for child in sorted(_children(stack, record["parent_run_id"]), key=lambda c: c.info.start_time):
        newest[child.data.tags["wysiwyc.run_name"]] = child
    status = {c.data.params["loss.class_mask_min_area"]: c.info.status for c in newest.values()}
    assert status == {"0.05": "FINISHED", "0.1": "FINISHED", "0.5": "FAILED"}
    assert newest[first["run_name"]].info.run_id == first["mlflow_run_id"]
