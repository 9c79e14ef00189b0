"""The command line as schedulers call it: help, --json summaries, exit codes, no heavy imports for help."""

import json
import subprocess
import sys

from conftest import run_cli as wysiwyc


def test_help_lists_the_stages():
    out = wysiwyc("--help").stdout
    for stage in ("ingest", "quickstart"):
        assert stage in out
    out = wysiwyc("ingest", "--help").stdout
    for source in ("voc", "coco", "synthetic", "images"):
        assert source in out


def test_version_is_the_installed_packages_and_verbosity_is_global(tmp_path):
    from importlib.metadata import version

    assert wysiwyc("--version").stdout.strip() == f"wysiwyc {version('wysiwyc')}"
    args = (
        "ingest",
        "synthetic",
        "--num-images",
        "4",
        "--seed",
        "1",
        "--split",
        "train",
        "--shard-size",
        "4",
        "--image-size",
        "24",
        "--workers",
        "1",
    )
    normal = wysiwyc(*args, "--out", str(tmp_path / "a"))
    quiet = wysiwyc("-q", *args, "--out", str(tmp_path / "b"))
    verbose = wysiwyc("-v", *args, "--out", str(tmp_path / "c"))
    assert "ingest synthetic train" in normal.stderr and "DEBUG" not in normal.stderr  # the progress bar
    assert quiet.stderr.strip() == "" and "ingest synthetic: done" in quiet.stdout  # no logs, no bars
    assert f"DEBUG pipeline.cli: wysiwyc {version('wysiwyc')}, Python" in verbose.stderr
    assert "ingest synthetic --num-images 4" in verbose.stderr
    both = wysiwyc("-v", "-q", *args, "--out", str(tmp_path / "d"), check=False)
    assert both.returncode == 2 and "not both" in both.stderr


def test_ingest_help_imports_no_heavy_module():
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom pipeline.cli import app\n"
        "r = CliRunner().invoke(app, ['ingest', 'voc', '--help'])\nassert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('torch', 'boto3', 'pycocotools', 'webdataset', 'mlflow', 'ray') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_ingest_synthetic_json_summary_has_the_contract_keys(tmp_path):
    out = tmp_path / "shards"
    proc = wysiwyc(
        "ingest",
        "synthetic",
        "--num-images",
        "12",
        "--seed",
        "1",
        "--split",
        "train",
        "--out",
        str(out),
        "--shard-size",
        "5",
        "--image-size",
        "32",
        "--workers",
        "1",
        "--json",
    )
    summary = json.loads(proc.stdout)
    assert summary["num_samples"] == 12 and summary["skipped"] == 0 and summary["shards"] == 3
    assert summary["manifest"] == str(out / "train.manifest.json")
    assert summary["output"] == str(out)
    assert json.loads((out / "train.manifest.json").read_text())["digest"] == summary["digest"]


def test_human_summary_and_config_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("ingest:\n  shard_size: 4\ndata:\n  image_size: 24\n")
    proc = wysiwyc(
        "ingest",
        "synthetic",
        "--num-images",
        "8",
        "--seed",
        "2",
        "--split",
        "val",
        "--out",
        str(tmp_path / "o"),
        "-c",
        str(cfg),
        "ingest.workers=1",
    )
    assert "ingest synthetic: done" in proc.stdout
    assert "num_samples" in proc.stdout and " 8" in proc.stdout
    manifest = json.loads((tmp_path / "o" / "val.manifest.json").read_text())
    assert [s["num_samples"] for s in manifest["shards"]] == [4, 4]


def test_bad_input_exits_non_zero_with_a_message_naming_it(tmp_path):
    proc = wysiwyc(
        "ingest",
        "voc",
        "--source",
        str(tmp_path / "missing"),
        "--split",
        "train",
        "--out",
        str(tmp_path / "o"),
        "--json",
        check=False,
    )
    assert proc.returncode == 2
    assert str(tmp_path / "missing") in proc.stderr
    assert "error" in json.loads(proc.stdout)


def test_bad_override_exits_non_zero_naming_the_key(tmp_path):
    proc = wysiwyc(
        "ingest",
        "synthetic",
        "--num-images",
        "2",
        "--seed",
        "0",
        "--split",
        "train",
        "--out",
        str(tmp_path),
        "ingest.shardsize=3",
        check=False,
    )
    assert proc.returncode == 2
    assert "ingest.shardsize" in proc.stderr and "shard_size" in proc.stderr


def test_a_text_file_given_as_a_checkpoint_is_an_error_saying_what_a_checkpoint_is(tmp_path):
    from pipeline.checkpoint import save_checkpoint
    from pipeline.models.explainer import build_explainer

    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\nline two\n")
    explainer = tmp_path / "explainer.pt"  # a real Explainer checkpoint, so that the Explanandum is read next
    save_checkpoint(
        {
            "kind": "explainer",
            "arch": "compact",
            "classes": ["a", "b"],
            "image_size": 32,
            "model": build_explainer("compact", 2).state_dict(),
        },
        str(explainer),
    )
    for overrides in (
        [f"explainer.checkpoint={notes}"],
        [f"explainer.checkpoint={explainer}", f"explanandum.checkpoint={notes}"],
    ):
        proc = wysiwyc("evaluate", *overrides, f"data.test={tmp_path}/test", "--json", check=False)
        assert proc.returncode == 2, proc.stderr
        message = json.loads(proc.stdout)["error"]
        assert message.startswith(
            f"evaluate: {notes} is not a wysiwyc checkpoint: it is a text file; a checkpoint "
            "is the .pt file that `wysiwyc train classifier` or `wysiwyc train explainer` "
            "writes"
        ), message
        assert "format 'wysiwyc-checkpoint/1'" in message and "Error" not in message
