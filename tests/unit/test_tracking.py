"""The tracker never raises for the server: records wait (in memory, then in the run's journal) and are
sent, in order, by a later tracker of the same run."""

import json
import time

from pipeline import tracking


def test_a_dead_server_costs_seconds_and_the_journal_is_sent_by_the_next_tracker(tmp_path):
    journal = str(tmp_path / "run" / tracking.PENDING_FILE)
    dead = tracking.Where("http://127.0.0.1:9", "e")  # the discard port: nothing listens
    started = time.monotonic()
    tracker = tracking.Tracker(dead, "r1", None, journal)
    tracker.log_params({"optim.lr": "0.001"})
    tracker.log_step(1, {"loss": 2.0})
    tracker.log_epoch(1, {"epoch": 1, "train_loss": 1.5})
    tracker.log_bytes(b"\x89PNG...", "overlays/epoch_001.png")
    tracker.end("FINISHED")
    assert time.monotonic() - started < 30 and tracker.run_id is None
    waiting = json.loads((tmp_path / "run" / tracking.PENDING_FILE).read_text())
    assert [op["op"] for op in waiting["ops"]] == ["open", "params", "metrics", "metrics", "artifact", "status"]

    # the run is launched again with a server that answers: the old records go first, then its own
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    again = tracking.Tracker(tracking.Where(store, "e"), "r1", None, journal)
    again.log_epoch(2, {"epoch": 2, "train_loss": 1.0})
    again.end("FINISHED")
    assert again.pending == 0
    run = again.client.get_run(again.run_id)
    assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.001"
    assert [m.value for m in again.client.get_metric_history(run.info.run_id, "train_loss")] == [1.5, 1.0]
    assert [a.path for a in again.client.list_artifacts(run.info.run_id, "overlays")] == ["overlays/epoch_001.png"]
    assert json.loads((tmp_path / "run" / tracking.PENDING_FILE).read_text())["ops"] == []


def test_finish_keeps_the_tag_for_later_when_the_server_is_away(tmp_path):
    root = str(tmp_path / "run")
    tracking.finish(tracking.Where("http://127.0.0.1:9", "e"), "abc", "s3://b/best.pt", root)
    waiting = json.loads((tmp_path / "run" / tracking.PENDING_FILE).read_text())
    assert waiting == {"run_id": "abc", "ops": [{"op": "tags", "tags": {"best_checkpoint": "s3://b/best.pt"}}]}


def test_one_rule_for_the_tracking_uri_in_training_the_registry_and_sweeps(tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.registry import registry_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri("http://127.0.0.1:5000", "ckpt") == "http://127.0.0.1:5000"
    assert tracking.resolve_uri(None, "sweeps/s1") == f"sqlite:///{tmp_path / 'sweeps' / 's1' / 'mlflow.db'}"
    assert tracking.resolve_uri(None, "s3://bucket/sweeps") == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    config = load_config(None, ["trainer.storage=ckpt"])
    assert tracking.default_uri(config) == registry_uri(config) == f"sqlite:///{tmp_path / 'ckpt' / 'mlflow.db'}"
    # MLflow's own convention reaches every one of them (a sweep used to log to its own sqlite file)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5001")
    assert (
        tracking.resolve_uri(None, "sweeps/s1")
        == tracking.default_uri(config)
        == registry_uri(config)
        == "http://127.0.0.1:5001"
    )
    assert tracking.resolve_uri("sqlite:///x.db", "sweeps/s1") == "sqlite:///x.db"  # tracking.uri still first
