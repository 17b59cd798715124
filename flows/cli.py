"""`cifar-pipeline`: train, predict and manage models from the command line.

Heavy imports (TensorFlow, Prefect) happen inside the commands that need them, so `--help` and
`models list` start fast.
"""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from model_lib.settings import artifacts_dir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter off the console

app = typer.Typer(help="Train, version and serve CIFAR-10-class image classifiers.", no_args_is_help=True)
models_app = typer.Typer(
    help="Inspect and manage the model registry under ARTIFACTS_DIR/models/.", no_args_is_help=True
)
app.add_typer(models_app, name="models")

ModelName = Annotated[str, typer.Option("--name", help="Registered model name.")]
VersionRef = Annotated[str, typer.Argument(help="cifar10, cifar10@latest, cifar10@v3 or a version folder.")]


@app.command()
def train(
    profile: Annotated[str, typer.Option(help="seed (the origin's recipe), smoke (a minute) or default.")] = "default",
    architecture: Annotated[str | None, typer.Option(help="seed_cnn, airbench or transfer.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over the training split.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per optimiser step.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    data: Annotated[str | None, typer.Option(help="Image folder, cifar-10-batches-py folder or 'keras'.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for split, weights and augmentation.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, float32, mixed_bfloat16 or mixed_float16.")] = None,
    validation_split: Annotated[float | None, typer.Option(help="Fraction held out for validation.")] = None,
    max_train_images: Annotated[int | None, typer.Option(help="Class-balanced cap on training images.")] = None,
    max_test_images: Annotated[int | None, typer.Option(help="Class-balanced cap on test images.")] = None,
    skip_corrupt: Annotated[
        bool | None, typer.Option("--skip-corrupt/--no-skip-corrupt", help="Skip undecodable files, reported.")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="Registered model name (default cifar10).")] = None,
    weights: Annotated[
        str | None, typer.Option(help="transfer only: imagenet (downloads), a local weights file, or none.")
    ] = None,
    head_epochs: Annotated[int | None, typer.Option(help="transfer only: epochs before fine-tuning.")] = None,
    fine_tune_learning_rate: Annotated[float | None, typer.Option(help="transfer only: fine-tuning LR.")] = None,
    promotion_margin: Annotated[float, typer.Option(help="Accuracy a new version must add to the champion's.")] = 0.0,
    export: Annotated[bool, typer.Option(help="Also write TFLite float32/float16/int8 exports.")] = False,
) -> None:
    """Run the train-cifar flow locally (Prefect's embedded temporary API; no server needed)."""
    from flows.train_cifar import train_cifar

    result = train_cifar(
        profile=profile,
        architecture=architecture,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        data=data,
        seed=seed,
        precision=precision,
        validation_split=validation_split,
        max_train_images=max_train_images,
        max_test_images=max_test_images,
        skip_corrupt=skip_corrupt,
        model_name=name,
        weights=weights,
        head_epochs=head_epochs,
        fine_tune_learning_rate=fine_tune_learning_rate,
        promotion_margin=promotion_margin,
        export=export,
    )
    verdict = "champion" if result["champion"] else "challenger"
    typer.echo(
        f"{result['name']} v{result['version']} ({verdict}): test accuracy {result['test_accuracy']:.4f}\n"
        f"  {result['path']}\n  gate: {result['reason']}"
    )


@app.command()
def predict(
    input_dir: Annotated[str, typer.Argument(help="Folder of images to classify.")],
    output: Annotated[
        str | None, typer.Option(help="CSV path (default ARTIFACTS_DIR/predictions/<folder>.csv).")
    ] = None,
    model: Annotated[str, typer.Option(help="cifar10, cifar10@latest, cifar10@v3 or a version folder.")] = "cifar10",
    top_k: Annotated[int, typer.Option(help="Ranked labels per image.")] = 3,
    batch_size: Annotated[int, typer.Option(help="Images per decoding job and per model call.")] = 256,
    recursive: Annotated[bool, typer.Option("--recursive/--no-recursive", help="Descend into sub-folders.")] = True,
    shard_size: Annotated[int, typer.Option(help="Files per shard task.")] = 2048,
    fail_on_error: Annotated[bool, typer.Option(help="Fail the run if any file cannot be classified.")] = False,
    dask_address: Annotated[str | None, typer.Option(help="Run shards on this Dask scheduler.")] = None,
    dask_workers: Annotated[int | None, typer.Option(help="Run shards on a local Dask cluster of N workers.")] = None,
) -> None:
    """Run the batch-predict flow: classify a folder of images into a CSV."""
    from flows.batch_predict import batch_predict, with_dask

    flow = with_dask(dask_address, dask_workers) if dask_address or dask_workers else batch_predict
    summary = flow(
        input_dir=input_dir,
        output_csv=output,
        model=model,
        top_k=top_k,
        batch_size=batch_size,
        recursive=recursive,
        shard_size=shard_size,
        fail_on_error=fail_on_error,
    )
    typer.echo(
        f"{summary['ok']} ok, {summary['error']} error, {summary['skipped']} skipped "
        f"({summary['images_per_second']} images/s, {summary['model']})\n  {summary['output_csv']}"
    )


@app.command("export")
def export_command(
    ref: VersionRef = "cifar10",
    formats: Annotated[str, typer.Option(help="Comma-separated: float32, float16, int8.")] = "float32,float16,int8",
) -> None:
    """Write TFLite exports beside a registered version, with interpreter-measured test accuracy."""
    from model_lib.export import export_version

    version_dir = _version_dir(ref)
    try:
        entries = export_version(version_dir, artifacts_dir(), tuple(f.strip() for f in formats.split(",")), typer.echo)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    for entry in entries:
        note = f"  FAILED: {entry['reason']}" if entry["status"] != "ok" else ""
        typer.echo(f"{version_dir / entry['file']}: accuracy {entry['test_accuracy']:.4f}{note}")


@app.command()
def serve() -> None:
    """Serve train-cifar (with its weekly schedule) and batch-predict from this process; no work pool.

    Uses the deployments declared in prefect.yaml. Needs a Prefect API (PREFECT_API_URL, e.g. a
    `prefect server start`) to see the schedule fire and to trigger runs from the UI or CLI.
    """
    from prefect import serve as prefect_serve

    from flows.serve import deployments_from_yaml

    prefect_serve(*deployments_from_yaml())


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _version_dir(ref: str):
    """The version folder a reference names, or a clean CLI error."""
    from model_lib.registry import RegistryError, parse_reference

    try:
        return parse_reference(ref, artifacts_dir())
    except RegistryError as error:
        _fail(str(error))


@models_app.command("list")
def models_list(name: ModelName = "cifar10") -> None:
    """Versions with alias marks, test accuracy and date."""
    from model_lib.registry import Registry

    state = Registry(artifacts_dir(), name).state()
    if not state["versions"]:
        typer.echo(f"{name}: no versions registered under {artifacts_dir() / 'models' / name}")
        return
    aliases = state["aliases"]
    typer.echo(f"{'version':>8}  {'aliases':<18} {'accuracy':>8}  {'created (UTC)':<25} architecture")
    for entry in state["versions"]:
        marks = ",".join(alias for alias, version in aliases.items() if version == entry["version"])
        accuracy = entry["test_accuracy"]
        shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        typer.echo(f"{'v' + str(entry['version']):>8}  {marks:<18} {shown:>8}  {entry['created_at']:<25} "
                   f"{entry['architecture']}")  # fmt: skip


@models_app.command("show")
def models_show(ref: VersionRef) -> None:
    """The version's manifest."""
    from model_lib.fileio import read_json
    from model_lib.registry import MANIFEST_FILE

    typer.echo(json.dumps(read_json(_version_dir(ref) / MANIFEST_FILE), indent=2))


@models_app.command("verify")
def models_verify(ref: VersionRef) -> None:
    """Check every file's sha256 against the manifest; exits 1 on any mismatch."""
    from model_lib.registry import verify_version

    version_dir = _version_dir(ref)
    problems = verify_version(version_dir)
    for problem in problems:
        typer.echo(f"FAILED {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"OK {version_dir}: every checksum matches")


@models_app.command("promote")
def models_promote(
    ref: Annotated[str, typer.Argument(help="cifar10@v3 (or name@latest).")],
    reason: Annotated[str, typer.Option(help="Why; recorded in the history.")] = "manual promotion",
) -> None:
    """Make a version champion by hand."""
    from model_lib.registry import Registry, RegistryError

    model_name, _, tag = ref.partition("@")
    try:
        version = Registry(artifacts_dir(), model_name or "cifar10").promote(tag or "latest", reason)
    except RegistryError as error:
        _fail(str(error))
    typer.echo(f"{model_name or 'cifar10'}@champion -> v{version}")


@models_app.command("rollback")
def models_rollback(
    name: ModelName = "cifar10",
    reason: Annotated[str, typer.Option(help="Why; recorded in the history.")] = "manual rollback",
) -> None:
    """Move champion back to the previous champion."""
    from model_lib.registry import Registry, RegistryError

    try:
        version = Registry(artifacts_dir(), name).rollback(reason)
    except RegistryError as error:
        _fail(str(error))
    typer.echo(f"{name}@champion -> v{version}")
