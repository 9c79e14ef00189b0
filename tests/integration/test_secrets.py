"""No secret in anything a run leaves behind: a Ray training, a Ray attribution and the Ray Serve endpoint
against a real SeaweedFS, launched as a user launches them (the CLI, credentials in the environment, a local Ray that
the command starts itself), then every file of Ray's session folder, the run folders, the MLflow store,
the commands' output and every object of the bucket is searched for the secret key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from conftest import CLI, _free_ports, explainer_state, run_cli
from PIL import Image

from pipeline import storage
from pipeline.checkpoint import save_checkpoint
from pipeline.config import IngestConfig
from pipeline.data.classes import SYNTHETIC_CLASSES
from pipeline.data.ingest import ingest
from pipeline.data.synthetic import SyntheticReader

pytestmark = [pytest.mark.s3, pytest.mark.slow]  # three commands that each start a Ray: ~3½ minutes

SIZE = 32


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(*args, "--json", env=env, cwd=cwd, timeout=600)


def _probe_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (120, 200, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _hits(secret: bytes, files: dict[str, bytes]) -> list[str]:
    return sorted(name for name, data in files.items() if secret in data)


def test_ray_training_and_attribution_leave_the_secret_nowhere(s3_server, s3_bucket, session_stack, tmp_path):
    secret = s3_server.secret_key
    assert len(secret) >= 30  # distinctive: no accidental match
    # attribution and the endpoint reach the registry with the password inside the tracking URI (user:password@, as
    # some teams write it): MLflow's auth app needs it, and it must land in no config, param, manifest or page
    password = session_stack.env["MLFLOW_TRACKING_PASSWORD"]
    assert len(password) >= 24
    tracking = session_stack.tracking_uri.replace("http://", f"http://promoter:{password}@")
    b = s3_bucket
    for split, n, seed in (("train", 32, 0), ("val", 16, 1)):
        ingest(
            SyntheticReader(n, seed, split, image_size=SIZE),
            f"s3://{b}/data",
            split,
            IngestConfig(workers=1, shard_size=8),
            opts=s3_server.opts,
            progress=False,
        )
    # Ray's socket paths must stay under 108 bytes: a short folder of its own, searched like the rest
    ray_tmp, work = Path(tempfile.mkdtemp(prefix="wy-ray-")), tmp_path / "work"
    work.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_"))
    }
    env.update(s3_server.env, WYSIWYC_RAY_TMP=str(ray_tmp), MLFLOW_DISABLE_TELEMETRY="true")
    common = [
        f"data.train=s3://{b}/data/train",
        f"data.val=s3://{b}/data/val",
        f"data.image_size={SIZE}",
        "data.loader_workers=0",
        "data.shuffle_buffer=8",
        "trainer.batch_size=8",
        "trainer.epochs=1",
        f"trainer.storage=s3://{b}/runs",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    outputs = []
    # the Ray training (2 DDP workers, checkpoints through Ray Train into the bucket)
    proc = _run(["train", "classifier", *common, "trainer.num_workers=2", "trainer.run_name=clf"], env, work)
    outputs.append(proc.stdout + proc.stderr)
    classifier = json.loads(proc.stdout)["checkpoint"]
    # an untrained Explainer of it (what is checked here is Ray, not the Explainer's training), then the Ray
    # Data attribution
    explainer = f"s3://{b}/models/explainer.pt"
    sha = hashlib.sha256(storage.read_bytes(classifier, s3_server.opts)).hexdigest()
    save_checkpoint(explainer_state(list(SYNTHETIC_CLASSES), SIZE, classifier, sha), explainer, s3_server.opts)
    proc = _run(
        [
            "attribute",
            "--model",
            explainer,
            "--input",
            f"s3://{b}/data/val",
            "--output",
            f"s3://{b}/out",
            "--run-id",
            "r1",
            "attribute.batch_size=8",
            "attribute.preview_images=2",
            f"tracking.uri={tracking}",
        ],
        env,
        work,
    )
    outputs.append(proc.stdout + proc.stderr)
    assert json.loads(proc.stdout)["num_ok"] == 16
    # its MLflow run, in the stack's server: logged through the URI's credentials, with the URI masked
    from mlflow import MlflowClient

    client = MlflowClient(session_stack.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("attribution").experiment_id])
    logged = json.dumps([{"params": r.data.params, "tags": r.data.tags} for r in runs])
    assert runs  # the credentials in the URI were what let it in
    outputs.append(logged)
    # the online endpoint (Ray Serve: controller, proxy and a replica reading the checkpoint from the bucket)
    (port,) = _free_ports(1)
    server = subprocess.Popen(
        [*CLI, "serve", "--model", explainer, "--port", str(port), f"tracking.uri={tracking}", "--json"],
        env=env,
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = json.loads(server.stdout.readline())["url"]
        request = urllib.request.Request(f"{url}/explain", _probe_png(), {"Content-Type": "image/png"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            assert json.loads(reply.read())["masks"]
        with urllib.request.urlopen(f"{url}/health", timeout=60) as reply:
            outputs.append(reply.read().decode())
    finally:
        server.send_signal(signal.SIGTERM)
        out, err = server.communicate(timeout=120)
    assert server.returncode == 0, err[-3000:]
    outputs.append(out + err)

    # Ray's session folders are their owner's alone: inside a folder no one else may enter
    sessions = [p for p in ray_tmp.glob("*/session_*") if p.is_dir() and not p.is_symlink()]
    assert len(sessions) == 3  # one per command that started Ray
    assert stat.S_IMODE(ray_tmp.stat().st_mode) == 0o700

    files = {
        str(p): p.read_bytes()
        for root in (tmp_path, ray_tmp)
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }
    shutil.rmtree(ray_tmp, ignore_errors=True)
    # Ray's token authentication was on, its token in the private folder alone: in no log, output or object
    token = files.pop(str(ray_tmp / "auth_token"))
    assert len(token) == 64
    assert any("runtime_env" in name for name in files) and any(name.endswith("mlflow.db") for name in files)
    client = s3_server.client()
    keys = [
        o["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=b)
        for o in page.get("Contents", [])
    ]
    assert any(k.startswith("runs/clf/checkpoint_") for k in keys) and any(k.startswith("out/r1/") for k in keys)
    files.update({f"s3://{b}/{k}": client.get_object(Bucket=b, Key=k)["Body"].read() for k in keys})
    files.update({f"output of command {i}": out.encode() for i, out in enumerate(outputs)})
    assert len(files) > 100
    assert _hits(secret.encode(), files) == []
    assert _hits(token, files) == []
    assert _hits(password.encode(), files) == []
