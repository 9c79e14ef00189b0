"""The ``wysiwyc`` command line: parse → load config → call one stage function → print its summary.

Heavy modules (torch, boto3, pycocotools) are imported inside the commands, so ``--help`` is fast.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import sys
from collections.abc import Callable
from enum import Enum
from typing import Annotated

import typer

app = typer.Typer(
    help="wysiwyc: train Explainers for frozen image classifiers and run them over image corpora.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
ingest_app = typer.Typer(
    help="Read a data source into WebDataset shards + manifest (local dir or s3://).", no_args_is_help=True
)
app.add_typer(ingest_app, name="ingest")
train_app = typer.Typer(help="Train the classifier (Explanandum) or an Explainer for it.", no_args_is_help=True)
app.add_typer(train_app, name="train")


class OnError(str, Enum):
    skip = "skip"
    fail = "fail"


ConfigOpt = Annotated[
    str | None,
    typer.Option("-c", "--config", help="YAML config file, or a preset's name (`wysiwyc presets` lists them)."),
]
Overrides = Annotated[list[str] | None, typer.Argument(help="Dotted overrides, e.g. data.image_size=64.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")]
OutOpt = Annotated[str, typer.Option("--out", help="Output prefix: a local directory or s3://bucket/prefix.")]
SplitOpt = Annotated[str, typer.Option("--split", help="Split name (shards are SPLIT-RUN-000000.tar).")]
ShardSizeOpt = Annotated[int | None, typer.Option("--shard-size", help="Samples per shard (default 1000).")]
OnErrorOpt = Annotated[
    OnError | None,
    typer.Option("--on-error", help="skip: record bad inputs in the manifest and go on; fail: stop, publish nothing."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a split that the output already holds.")]
WorkersOpt = Annotated[int | None, typer.Option("--workers", help="Encoding processes (default: all cores).")]


_LOG_LEVEL = {"level": logging.INFO}  # set by the global -v / -q options (this process's logs)


def _print_version(value: bool) -> None:
    if value:
        from pipeline import __version__

        print(f"wysiwyc {__version__}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Debug logs on stderr.")] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "-q", "--quiet", help="Only warnings and errors on stderr, no progress bars (the summary still prints)."
        ),
    ] = False,
) -> None:
    """Options of every command: wysiwyc [-v | -q] COMMAND ..."""
    from pipeline import progress

    if verbose and quiet:
        raise typer.BadParameter("give -v (more) or -q (less), not both")
    _LOG_LEVEL["level"] = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    progress.set_enabled(not quiet)


def _print_summary(title: str, summary: dict, as_json: bool, text: Callable[[dict], str] | None = None) -> None:
    if as_json:
        print(json.dumps(summary, default=str))
        return
    if text is not None:  # a command with a view of its own for a person
        print(text(summary))
        return
    print(title)
    width = max(len(k) for k in summary) if summary else 0
    for key, value in summary.items():
        if value is None or value == [] or value == {}:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        print(f"  {key.ljust(width)}  {value}")


def _run(title: str, as_json: bool, stage: Callable[[], dict], text: Callable[[dict], str] | None = None) -> dict:
    """Run a stage; print its summary (``text`` formats it for a person; ``--json``: one JSON object) and
    return it, or a clear error and exit non-zero."""
    from pipeline.errors import WysiwycError

    logging.basicConfig(level=_LOG_LEVEL["level"], stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if logging.getLogger().isEnabledFor(logging.DEBUG):  # -v: what ran, for a bug report (secrets redacted)
        from pipeline import __version__
        from pipeline.storage import redact

        logging.getLogger("pipeline.cli").debug(
            "wysiwyc %s, Python %s: wysiwyc %s", __version__, sys.version.split()[0], redact(shlex.join(sys.argv[1:]))
        )
    try:
        # stdout is the summary's: libraries that print there (MLflow's "View run" links, Ray Tune's
        # status table) go to stderr with the logs
        with contextlib.redirect_stdout(sys.stderr):
            summary = stage()
    except WysiwycError as exc:
        from pipeline.storage import redact

        message = redact(str(exc))
        if as_json:
            print(json.dumps({"error": message}))
        print(f"error: {message}", file=sys.stderr)
        raise typer.Exit(2) from None
    _print_summary(title, summary, as_json, text)
    return summary


def _load(config: str | None, overrides: list[str] | None, **flags):
    """The config from ``-c`` and overrides, with explicit command-line flags applied last."""
    from pipeline.config import load_config

    extra = [f"{k}={v}" for k, v in flags.items() if v is not None]
    return load_config(config, list(overrides or []) + extra)


def _ingest(
    kind: str, make_reader, split: str, out: str, config, overrides, shard_size, on_error, overwrite, workers, as_json
) -> None:
    def stage() -> dict:
        from pipeline.data.ingest import ingest

        cfg = _load(
            config,
            overrides,
            **{
                "ingest.shard_size": shard_size,
                "ingest.on_error": on_error.value if on_error else None,
                "ingest.overwrite": True if overwrite else None,
                "ingest.workers": workers,
            },
        )
        opts = cfg.storage.options()
        reader = make_reader(cfg, opts)
        return ingest(reader, out, split, cfg.ingest, opts, progress=True, max_pixels=cfg.data.max_image_pixels)

    _run(f"ingest {kind}: done", as_json, stage)


@ingest_app.command("voc")
def ingest_voc(
    source: Annotated[str, typer.Option("--source", help="VOCdevkit/VOC2007 folder or its parent.")],
    split: SplitOpt,
    out: OutOpt,
    classes: Annotated[
        str | None, typer.Option(help="Comma-separated class list (default: the 20 VOC classes).")
    ] = None,
    difficult: Annotated[
        bool, typer.Option("--difficult/--no-difficult", help="Count difficult objects as labels.")
    ] = True,
    shard_size: ShardSizeOpt = None,
    on_error: OnErrorOpt = None,
    overwrite: OverwriteOpt = False,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """PASCAL VOC (2007 layout): JPEGs, XML labels, SegmentationClass PNGs when present."""

    def make_reader(cfg, opts):
        from pipeline.data.voc import VOCReader

        names = [c.strip() for c in classes.split(",")] if classes else cfg.data.classes
        return VOCReader(source, split, classes=names, use_difficult=difficult)

    _ingest("voc", make_reader, split, out, config, overrides, shard_size, on_error, overwrite, workers, json_)


@ingest_app.command("coco")
def ingest_coco(
    annotations: Annotated[str, typer.Option("--annotations", help="COCO instances JSON.")],
    images: Annotated[str, typer.Option("--images", help="Folder of the images the JSON names.")],
    split: SplitOpt,
    out: OutOpt,
    drop_empty: Annotated[bool, typer.Option(help="Drop images without annotations.")] = False,
    shard_size: ShardSizeOpt = None,
    on_error: OnErrorOpt = None,
    overwrite: OverwriteOpt = False,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """MS-COCO instances (2014/2017): labels and rasterised class-index maps (pycocotools)."""

    def make_reader(cfg, opts):
        from pipeline.data.coco import COCOReader

        return COCOReader(annotations, images, split, drop_empty=drop_empty)

    _ingest("coco", make_reader, split, out, config, overrides, shard_size, on_error, overwrite, workers, json_)


@ingest_app.command("synthetic")
def ingest_synthetic(
    num_images: Annotated[int, typer.Option("--num-images", help="How many images.")],
    seed: Annotated[int, typer.Option("--seed", help="Generator seed (same seed, same images).")],
    split: SplitOpt,
    out: OutOpt,
    image_size: Annotated[
        int | None, typer.Option("--image-size", help="Side in pixels (default data.image_size).")
    ] = None,
    difficulty: Annotated[
        str,
        typer.Option("--difficulty", help="standard (the quickstart's) or hard (smaller objects, more clutter)."),
    ] = "standard",
    shard_size: ShardSizeOpt = None,
    on_error: OnErrorOpt = None,
    overwrite: OverwriteOpt = False,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """Synthetic multi-label shapes on clutter with exact per-pixel ground truth (data.classes: a subset of
    the shapes)."""

    def make_reader(cfg, opts):
        from pipeline.data.synthetic import SyntheticReader

        size = image_size or cfg.data.image_size
        return SyntheticReader(
            num_images, seed, split, image_size=size, classes=cfg.data.classes, difficulty=difficulty
        )

    _ingest("synthetic", make_reader, split, out, config, overrides, shard_size, on_error, overwrite, workers, json_)


@ingest_app.command("images")
def ingest_images(
    source: Annotated[str, typer.Option("--source", help="Prefix of .jpg/.jpeg/.png files (local or s3://).")],
    out: OutOpt,
    split: Annotated[str, typer.Option("--split", help="Split name.")] = "images",
    shard_size: ShardSizeOpt = None,
    on_error: OnErrorOpt = None,
    overwrite: OverwriteOpt = False,
    workers: WorkersOpt = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """Unlabelled images under a prefix (the input of batch attribution)."""

    def make_reader(cfg, opts):
        from pipeline.data.images import ImageFolderReader

        return ImageFolderReader(source, opts=opts)

    _ingest("images", make_reader, split, out, config, overrides, shard_size, on_error, overwrite, workers, json_)


def _train(kind: str, config: str | None, overrides: list[str] | None, as_json: bool) -> None:
    def stage() -> dict:
        from pipeline.train import launch

        cfg = _load(config, overrides)
        return launch.train_classifier(cfg) if kind == "classifier" else launch.train_explainer(cfg)

    _run(f"train {kind}: done", as_json, stage)


@train_app.command("classifier")
def train_classifier(config: ConfigOpt = None, overrides: Overrides = None, json_: JsonOpt = False) -> None:
    """Train the Explanandum (multi-label BCE) on data.train; prints the best checkpoint URI."""
    _train("classifier", config, overrides, json_)


@train_app.command("explainer")
def train_explainer(config: ConfigOpt = None, overrides: Overrides = None, json_: JsonOpt = False) -> None:
    """Train an Explainer for the frozen explanandum.model; prints the best checkpoint URI."""
    _train("explainer", config, overrides, json_)


@app.command()
def evaluate(config: ConfigOpt = None, overrides: Overrides = None, json_: JsonOpt = False) -> None:
    """The paper's metrics for explainer.checkpoint against Grad-CAM, RISE and constant masks on data.test.

    A registered version (models:/…) keeps the digest of the split its numbers came from: a promotion gate on that
    split is refused (a number that chooses is a validation number)."""

    def stage() -> dict:
        from pipeline import tracking
        from pipeline.evaluate.evaluate import evaluate as run_evaluate
        from pipeline.workflows.promotion import record_published_split

        loaded = _load(config, overrides)
        summary = run_evaluate(loaded)
        if summary["explainer"].startswith("models:/"):
            record_published_split(summary["explainer"], summary["test_digest"], tracking.registry_uri(loaded))
        return summary

    _run("evaluate: done", json_, stage)


@app.command()
def sanity(config: ConfigOpt = None, overrides: Overrides = None, json_: JsonOpt = False) -> None:
    """Sanity check of explainer.checkpoint: retrain its Explainer (same keys as train explainer) against a
    randomised and a permuted-labels classifier; their masks must lose the real ones' (exit 1 if they do not)."""

    outcome: dict = {}

    def stage() -> dict:
        from pipeline.workflows.sanity import run_sanity

        outcome.update(run_sanity(_load(config, overrides)))
        return outcome

    _run("sanity: done", json_, stage)
    if not outcome["passed"]:
        raise typer.Exit(1)  # a failed verdict (2: an error)


@app.command()
def sweep(
    config: Annotated[str, typer.Option("-c", "--config", help="Sweep file (see configs/sweeps/).")],
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """Sweep λ (any config key) on Ray Tune, one TorchTrainer per trial; the same sweep.name resumes."""

    def stage() -> dict:
        from pipeline.tune import load_sweep, run_sweep

        return run_sweep(load_sweep(config, overrides))

    _run("sweep: done", json_, stage)


# ------------------------------------------------------------------- wysiwyc register / promote

NameOpt = Annotated[str, typer.Option("--name", help="Registered model name, e.g. voc-vgg16.")]


@app.command()
def register(
    name: NameOpt,
    checkpoint: Annotated[
        str | None, typer.Option("--checkpoint", help="Explainer (or, with --classifier, classifier) checkpoint URI.")
    ] = None,
    from_sweep: Annotated[
        str | None, typer.Option("--from-sweep", help="Register the best trial of this sweep (its sweep.json).")
    ] = None,
    classifier: Annotated[
        bool, typer.Option("--classifier", help="The checkpoint is a classifier (pyfunc: images → probabilities).")
    ] = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """Package an Explainer (or a classifier) as a new MLflow model version with alias `candidate`."""

    def stage() -> dict:
        from pipeline.errors import WysiwycError
        from pipeline.registry import register_checkpoint, register_classifier, register_from_sweep

        if (checkpoint is None) == (from_sweep is None):
            raise WysiwycError("register: give exactly one of --checkpoint URI or --from-sweep NAME")
        cfg = _load(config, overrides)
        if classifier:
            if checkpoint is None:
                raise WysiwycError("register --classifier: give the classifier's --checkpoint URI")
            return register_classifier(checkpoint, name, cfg)
        if from_sweep is not None:
            return register_from_sweep(from_sweep, name, cfg)
        return register_checkpoint(checkpoint, name, cfg)

    _run("register: done", json_, stage)


@app.command()
def promote(
    name: NameOpt,
    version: Annotated[
        str | None, typer.Option("--version", help="Version to promote (a number, or an alias such as candidate).")
    ] = None,
    gate: Annotated[
        str | None,
        typer.Option("--gate", help="Gate file or preset (default registry.gate: configs/gates/default.yaml)."),
    ] = None,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Make previous-champion the champion again instead.")
    ] = False,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """Run the gate on a version and move `champion` to it (exit 2 with the reason when it fails)."""

    def stage() -> dict:
        from pipeline.errors import WysiwycError
        from pipeline.workflows import promotion

        cfg = _load(config, overrides, **{"registry.gate": gate})
        if rollback:
            if version is not None:
                raise WysiwycError("promote: --rollback restores previous-champion; do not give --version")
            return promotion.rollback(name, cfg)
        if version is None:
            raise WysiwycError("promote: give --version V (or --rollback)")
        return promotion.promote(name, version, cfg)

    _run("promote: rolled back" if rollback else "promote: done", json_, stage)


@app.command()
def serve(
    model: Annotated[str | None, typer.Option("--model", help="models:/NAME@champion (serve.model).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="HTTP port (serve.port, default 8000).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address (serve.host, default 127.0.0.1).")] = None,
    replicas: Annotated[int | None, typer.Option("--replicas", help="Model replicas (serve.replicas).")] = None,
    refresh: Annotated[
        float | None, typer.Option("--refresh", help="Re-resolve the alias every N seconds (serve.refresh_s).")
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """Serve a registered Explainer over HTTP on Ray Serve (POST /explain, GET /health) until stopped."""

    def stage() -> dict:
        from pipeline.serve import serve_forever

        cfg = _load(
            config,
            overrides,
            **{
                "serve.model": model,
                "serve.port": port,
                "serve.host": host,
                "serve.replicas": replicas,
                "serve.refresh_s": refresh,
            },
        )

        def ready(url: str, health: dict) -> None:  # the one line a script waits for, on stdout at once
            line = {"url": url, "model_version": health["model_version"]} if json_ else None
            text = (
                json.dumps(line) if json_ else f"serving {cfg.serve.model} (version {health['model_version']}) at {url}"
            )
            print(text, file=sys.__stdout__, flush=True)

        return serve_forever(cfg, on_ready=ready)

    _run("serve: stopped", json_, stage)


@app.command()
def lineage(
    model: Annotated[str, typer.Argument(help="models:/NAME@alias or models:/NAME/V.")],
    config: ConfigOpt = None,
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """Where a registered Explainer comes from and where it went: data digests → classifier version →
    Explainer version → the attribution runs that used it."""

    def stage() -> dict:
        from pipeline.registry import lineage as chain

        return chain(model, _load(config, overrides))

    from pipeline.registry.lineage import lineage_text

    _run("lineage", json_, stage, text=lineage_text)


@app.command()
def attribute(
    model: Annotated[
        str | None,
        typer.Option(
            "--model", help="models:/NAME@alias (resolved once, recorded) or a checkpoint URI (explainer.checkpoint)."
        ),
    ] = None,
    input_: Annotated[
        str | None,
        typer.Option("--input", help="Image prefix (local or s3://), shard split, or a file listing image URIs."),
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="Output prefix; the run writes OUTPUT/RUN_ID/.")
    ] = None,
    run_id: Annotated[
        str | None,
        typer.Option("--run-id", help="Run id (default: UTC time); the same id resumes, a complete run is left as is."),
    ] = None,
    config: ConfigOpt = None,
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """Masks + index for every image of a corpus on Ray Data (resumable, idempotent; see configs/attribute/).

    Exit 3 when the run completed but a class drifted and attribute.fail_on_drift is set (2: an error)."""
    fail_on_drift = []

    def stage() -> dict:
        from pipeline.attribute import attribute as run_attribute

        flags = {"explainer.checkpoint": model, "attribute.input": input_, "output": output, "attribute.run_id": run_id}
        # JSON-quoted: a run id such as 2026-11-29 stays a string (YAML would read a date)
        cfg = _load(config, overrides, **{k: json.dumps(v) for k, v in flags.items() if v})
        fail_on_drift.append(cfg.attribute.fail_on_drift)
        return run_attribute(cfg)

    summary = _run("attribute: done", json_, stage)
    if fail_on_drift and fail_on_drift[0] and (summary.get("drift") or {}).get("flagged"):
        print(
            f"attribute: drift in {', '.join(summary['drift']['flagged'])} (attribute.fail_on_drift)", file=sys.stderr
        )
        raise typer.Exit(3)


@app.command()
def quickstart(
    workdir: Annotated[str, typer.Option("--workdir", help="Where everything is written.")] = "runs/quickstart",
    with_stack: Annotated[
        bool,
        typer.Option(
            "--with-stack", help="Use the running `wysiwyc stack` (S3 + MLflow server) instead of local files."
        ),
    ] = False,
    num_images: Annotated[int, typer.Option("--num-images", help="Synthetic training images.")] = 2000,
    num_corpus: Annotated[int, typer.Option("--num-corpus", help="Images the attribution stage explains.")] = 200,
    overrides: Overrides = None,
    json_: JsonOpt = False,
) -> None:
    """The main job on the embedded defaults: data → classifier → Explainer → evaluation → registry →
    attribution → report.html (overrides apply to every stage's config/cpu preset)."""

    def show(name: str, index: int, total: int, status: str) -> None:
        typer.echo(f"[{index}/{total}] {name}: {status}", err=True)

    def stage() -> dict:
        from pipeline.workflows.quickstart import run_quickstart

        return run_quickstart(
            workdir,
            with_stack=with_stack,
            on_stage=show,
            overrides=list(overrides or []),
            num_images=num_images,
            num_corpus=num_corpus,
        )

    _run("quickstart: done", json_, stage)


@app.command()
def presets(
    name: Annotated[str | None, typer.Argument(help="A preset's short name, e.g. cpu/explainer.")] = None,
) -> None:
    """List the presets shipped with the package, or print one (a starting point to copy and edit)."""
    from pipeline.config import PRESETS, config_file, preset_names
    from pipeline.errors import WysiwycError

    try:
        if name is not None:
            typer.echo(config_file(name).read_text(), nl=False)
            return
        for short in preset_names():
            lines = (PRESETS / f"{short}.yaml").read_text().splitlines()
            typer.echo(f"{short:34s} {lines[0].lstrip('# ') if lines and lines[0].startswith('#') else ''}")
    except WysiwycError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


# ------------------------------------------------------------------------------- wysiwyc stack

stack_app = typer.Typer(
    help="The local production-like stack: SeaweedFS (S3) + an MLflow server, in the background on 127.0.0.1.",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")
StateDirOpt = Annotated[
    str | None,
    typer.Option(
        "--state-dir",
        help="Where the stack keeps data, logs, PID records and credentials "
        "(default $WYSIWYC_STACK_DIR or ~/.wysiwyc/stack).",
    ),
]


@stack_app.command("up")
def stack_up(
    state_dir: StateDirOpt = None,
    s3_port: Annotated[
        int | None, typer.Option("--s3-port", help="S3 port (default: the last one, else 8333).")
    ] = None,
    mlflow_port: Annotated[
        int | None, typer.Option("--mlflow-port", help="MLflow port (default: the last one, else 5000).")
    ] = None,
    bucket: Annotated[str | None, typer.Option("--bucket", help="Bucket to create (default wysiwyc).")] = None,
    show_secrets: Annotated[
        bool, typer.Option("--show-secrets", help="Also print the secret key (the export lines; in `env` with --json).")
    ] = False,
    json_: JsonOpt = False,
) -> None:
    """Start SeaweedFS and the MLflow server (a no-op when running); prints the env file to `source`."""
    shown: dict = {}

    def stage() -> dict:
        from pipeline import stack

        summary = stack.stack_up(
            state_dir, s3_port=s3_port, mlflow_port=mlflow_port, bucket=bucket, show_secrets=show_secrets
        )
        if json_:
            return summary
        shown.update(env=summary.pop("env"), env_file=summary["env_file"])
        return summary

    _run("stack up: running", json_, stage)
    if not shown:
        return
    if show_secrets:
        print("\n# the environment to export (what the env_file above holds)")
        print("\n".join(f"export {key}={shlex.quote(value)}" for key, value in shown["env"].items()))
    else:
        print("\n# to use it (the file holds the secret key; --show-secrets prints it):")
        print(f"source {shlex.quote(shown['env_file'])}")


@stack_app.command("status")
def stack_status(state_dir: StateDirOpt = None, json_: JsonOpt = False) -> None:
    """Check that both services run and answer; exits 1 when the stack is not healthy."""
    healthy = []

    def stage() -> dict:
        from pipeline import stack

        summary = stack.stack_status(state_dir)
        healthy.append(summary["healthy"])
        return summary

    _run("stack status:", json_, stage)
    if not healthy[0]:
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down(state_dir: StateDirOpt = None, json_: JsonOpt = False) -> None:
    """Stop exactly the processes `stack up` started; the data stays for the next `up`."""

    def stage() -> dict:
        from pipeline import stack

        return stack.stack_down(state_dir)

    _run("stack down: stopped", json_, stage)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
