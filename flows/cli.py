"""`cifar-pipeline`: train, predict and manage models from the command line.

Heavy imports (TensorFlow, Prefect) happen inside the commands that need them, so `--help` and
`models list` start fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Annotated

import typer

from flows import local_server, stopping
from flows.surfaces import command_options
from model_lib.checks import check_training_request
from model_lib.config import (
    APP_BOUNDS,
    APP_PORT,
    DEFAULT_KEEP,
    ENGINES,
    MAX_MEGAPIXELS,
    MAX_UPLOAD_MB,
    RELOAD_SECONDS,
    TOKEN_ENV,
    ConfigError,
    check_engine,
    check_number,
    check_run_limits,
    parse_image_size,
    profile_time,
    resolve_config,
)
from model_lib.progress import PROGRESS_SECONDS, stop_requested
from model_lib.requests import (
    DEFAULT_MODEL,
    PREDICT_REQUEST,
    PRUNE_REQUEST,
    TRAIN_REQUEST,
    field_named,
    training_overrides,
)
from model_lib.serving import DEFAULT_FORMATS, ONNX_FORMATS, TFLITE_FORMATS
from model_lib.settings import artifacts_location, require_keras, work_dir
from model_lib.transfer import loads_weights_file

QUIET_SECONDS = 5.0  # a copy that pauses longer than this between files gives two events
PREFECT_HEALTH_SECONDS = 5.0  # how long PREFECT_API_URL's server may take to answer its health check

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ notes (cuInit without a GPU) off the console
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry (and its errors offline)

app = typer.Typer(help="Train, version and serve CIFAR-10-class image classifiers.", no_args_is_help=True)
models_app = typer.Typer(
    help="Inspect and manage the model registry under ARTIFACTS_DIR/models/.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
server_app = typer.Typer(
    help="The local Prefect server that commands share when PREFECT_API_URL is unset (one per PREFECT_HOME).",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")
DEBUG_ENV = "CIFAR_PIPELINE_DEBUG"  # set to 1 for tracebacks, like --debug
_debug = False
_stop_result = "the command did not finish"  # what a stop leaves, set by the command that can be stopped


def _stoppable(result: str) -> None:
    """From here on, Ctrl-C and SIGTERM stop this command cleanly; `result` says what a stop leaves."""
    global _stop_result
    _stop_result = result
    stopping.install()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help=f"Show tracebacks of errors (or set {DEBUG_ENV}=1).")] = False,
) -> None:
    global _debug
    _debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if _debug:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    _warnings_as_lines()


class _StderrNow(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is said (a test's capture may have replaced it since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _warnings_as_lines() -> None:
    """The library's warnings (a store that stopped answering) print as one `warning:` line each, before the
    `error:` line a lasting problem ends with, and not again through Prefect's console."""
    from model_lib.stores import STORE_LOG

    if not STORE_LOG.handlers:
        handler = _StderrNow()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        STORE_LOG.addHandler(handler)
        STORE_LOG.propagate = False


def main() -> None:
    """The console script: the project's own errors and OS errors print one line and exit 1 (2 for usage);
    a command stopped by Ctrl-C or SIGTERM prints one line and exits 130 or 143 (flows/stopping.py)."""
    try:
        app()
    except Exception as error:
        if stop_requested():
            _stopped()
        if _debug or not _expected(error):
            raise

        typer.echo(f"error: {error}", err=True)
        sys.exit(2 if isinstance(error, ConfigError) else 1)
    except BaseException as error:  # Stopped, or Prefect's TerminationSignal
        if stop_requested() and not isinstance(error, SystemExit):
            _stopped()
        raise


def _stopped() -> None:
    stopping.stop_children()
    typer.echo(f"{stopping.interrupted_line()}: {_stop_result}", err=True)
    sys.exit(stopping.exit_code())


def _expected(error: BaseException) -> bool:
    """Errors that say what is wrong in their message: the project's own, and the OS's (disk, permissions)."""
    return type(error).__module__.split(".")[0] in ("model_lib", "flows", "tasks") or isinstance(error, OSError)


def _import_tensorflow_quietly() -> None:
    if not _debug:  # --debug shows TensorFlow's notes too
        from tasks.common import import_tensorflow_quietly

        import_tensorflow_quietly()


def _keras_serves(model) -> bool:
    """Whether model.keras answers (else a TFLite export, on LiteRT: no TensorFlow, no Keras, so a serving install
    without the `train` extra runs it, and a one-off prediction of 10 images takes 7.7 s instead of 11.7 s on a
    2-core AMD EPYC Zen 5). Resolving the model refused already where Keras is needed and not installed."""
    from model_lib.runs import MODEL_FILE

    return model.model_file == MODEL_FILE


class PrefectUnreachable(RuntimeError):
    """PREFECT_API_URL names a server that does not answer as Prefect does."""


def _require_prefect_api() -> None:
    """With PREFECT_API_URL set, a Prefect server must answer there before anything loads or trains: else one
    line names the setting and what to do, instead of minutes of retries and a page of traceback.
    Without it, use this PREFECT_HOME's local server, started on first use (flows/local_server.py).

    Raises:
        PrefectUnreachable: Nothing answers at the address, or what answers is not a Prefect API.
    """
    import pydantic
    from prefect.settings import PREFECT_API_URL

    try:
        api = PREFECT_API_URL.value()  # every Prefect setting is validated here
        if not api:
            _use_local_server()
            return
    except pydantic.ValidationError as error:
        raise ConfigError(_invalid_prefect_setting(error)) from None
    advice = "unset PREFECT_API_URL to use the local server, or start yours (prefect server start)"
    import httpx

    try:
        response = httpx.get(f"{api.rstrip('/')}/health", timeout=PREFECT_HEALTH_SECONDS)
    except httpx.HTTPError as error:
        problem = f"no Prefect server answers there ({type(error).__name__})"
        raise PrefectUnreachable(f"PREFECT_API_URL={api}: {problem}; {advice}") from None
    if response.status_code != 200 or response.text.strip() != "true":
        raise PrefectUnreachable(
            f"PREFECT_API_URL={api}: what answers there is not a Prefect API (/health gave HTTP "
            f"{response.status_code}); {advice}"
        )


def _use_local_server() -> None:
    """Point this process, and what it starts, at the local server (started here if none answers)."""
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL

    url, started = local_server.connect()
    os.environ[PREFECT_API_URL.name] = url  # for this process's threads and what it starts
    os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI (as Prefect's temporary server): no "View at" link
    refresh_global_settings_context()
    if started:
        typer.echo(
            f"Started a local Prefect server at {url}; later commands share it, and it stops after "
            f"{local_server.idle_seconds():g} s unused ({local_server.IDLE_ENV}; `cifar-pipeline server stop`)",
            err=True,
        )


def _invalid_prefect_setting(error) -> str:
    """One line for a Prefect setting that does not validate, naming its environment variable where one is set."""
    problem = error.errors()[0]
    field, value = str(problem["loc"][-1]).upper(), problem.get("input")
    names = [name for name in os.environ if name.startswith("PREFECT_") and name.endswith(field)]
    named = next((name for name in names if os.environ[name] == value), f"the Prefect setting {field.lower()}")
    return f"{named}={value!r}: {problem['msg'].lower()} (Prefect's settings: the environment and its profile)"


def _console_without_expected_tracebacks() -> None:
    """Prefect logs a failed run's traceback on the console; for an expected error the last line says it all,
    and after Ctrl-C the flow run's crash says what each stopped task's would.

    The traceback still goes to the Prefect API (the UI shows it); `--debug` keeps it on the console.
    """
    if _debug:
        return
    import logging

    from prefect.logging.configuration import ensure_logging_setup

    class DropExpectedTracebacks(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if stop_requested() and record.name == "prefect.task_runs" and record.levelno >= logging.ERROR:
                return False  # each stopped task's crash: the flow run's line and the command's say it once
            if record.exc_info and record.exc_info[1] is not None and _expected(record.exc_info[1]):
                record.exc_info, record.exc_text = None, None
            return True

    ensure_logging_setup()
    for handler in logging.getLogger().handlers:
        handler.addFilter(DropExpectedTracebacks())


ModelName = Annotated[str, typer.Option("--name", help="Registered model name.")]
EngineOption = Annotated[str, typer.Option(help=field_named(PREDICT_REQUEST, "engine").cli_help)]  # as `predict`'s
VersionRef = Annotated[str, typer.Argument(help="cifar10, cifar10@latest, cifar10@v3 or a version folder.")]


@app.command()
@command_options(TRAIN_REQUEST)
def train(**request) -> None:
    """Run the train-cifar flow in this process (on the shared local Prefect server unless PREFECT_API_URL is set)."""
    require_keras("training")
    if request["image_size"] is not None:
        request["image_size"] = parse_image_size(request["image_size"])
    if loads_weights_file(request["weights"]):
        _import_tensorflow_quietly()  # the request's check loads the file into Keras: without TensorFlow's notes
    profile = request["profile"]
    config = check_training_request(profile, training_overrides(request), artifacts_location())  # costs a second
    check_run_limits(request["timeout_minutes"], request["promotion_margin"])
    usual = resolve_config(profile).epochs
    epochs_note = f" at its {usual} epochs, this run has {config.epochs}" if config.epochs != usual else ""
    if request["export"]:
        from model_lib.export import require_tensorflow_backend

        require_tensorflow_backend()  # before training, not after
    typer.echo(
        f"Training profile {profile}: {profile_time(profile)} on a 2-core CPU with CIFAR-10{epochs_note} (less with "
        f"--max-train-images or a GPU); progress as a bar on a terminal, else a line every {PROGRESS_SECONDS} s.",
        err=True,
    )
    _stoppable("the train-cifar run is marked Crashed; no version was registered (the same command resumes)")
    _require_prefect_api()
    from flows.train_cifar import train_cifar

    _console_without_expected_tracebacks()
    _import_tensorflow_quietly()
    _echo_registration(train_cifar(**request))


@app.command()
@command_options(PREDICT_REQUEST)
def predict(**request) -> None:
    """Run the batch-predict flow: classify a folder of images into a CSV."""
    from model_lib.predict import plan_request

    dask_address, dask_workers = request.pop("dask_address"), request.pop("dask_workers")
    # Checked here too, so a mistake costs a second, not a Prefect start-up.
    plan = plan_request(request, artifacts_location())
    keras_serves = _keras_serves(plan.model)
    _stoppable("the batch-predict run is marked Crashed; no CSV was written")
    _require_prefect_api()
    typer.echo(f"Classifying {plan.root} with {plan.model.version}; starting Prefect and the model...", err=True)
    from flows.batch_predict import batch_predict, with_dask

    flow = with_dask(dask_address, dask_workers) if dask_address or dask_workers else batch_predict
    _console_without_expected_tracebacks()
    if keras_serves:
        _import_tensorflow_quietly()
    summary = flow(**request)
    typer.echo(
        f"{summary['ok']} ok ({summary['flagged']} flagged unsure), {summary['error']} error, "
        f"{summary['skipped']} skipped ({summary['images_per_second']} images/s, {summary['model']})\n"
        f"  {summary['output_csv']}"
    )


FORMATS_HELP = (
    f"Comma-separated: {', '.join(TFLITE_FORMATS)} (TFLite), {', '.join(ONNX_FORMATS)} (ONNX, with the onnx extra)."
)


@app.command("export")
def export_command(
    ref: VersionRef = "cifar10",
    formats: Annotated[str, typer.Option(help=FORMATS_HELP)] = ",".join(DEFAULT_FORMATS),
    force: Annotated[bool, typer.Option(help="Convert again formats already exported and intact.")] = False,
) -> None:
    """Write TFLite (and ONNX) exports beside a registered version, with test accuracy measured by their engines.

    Formats already exported whose files match the manifest's checksums are kept (--force redoes them)."""
    from model_lib.export import check_formats, export_version, exports_kept, require_tensorflow_backend

    chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
    check_formats(chosen)  # usage errors (exit 2) before TensorFlow's import (5 s of CPU) and the model's load
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        require_tensorflow_backend()  # refused before anything else
    version_dir = _version_dir(ref)
    _stoppable("no export was added to the manifest")
    kept = exports_kept(version_dir, chosen, force)
    if set(chosen) - set(kept):  # else nothing to convert: no TensorFlow
        require_keras("exporting")
        _import_tensorflow_quietly()  # before keras imports it loudly
        require_tensorflow_backend()
    try:
        entries = export_version(version_dir, work_dir(), chosen, typer.echo, force=force, kept=kept)
    except (FileNotFoundError, ValueError) as error:
        _fail(str(error))
    for entry in entries:
        note = f"  FAILED: {entry['reason']}" if entry["status"] != "ok" else ""
        typer.echo(f"{version_dir / entry['file']}: accuracy {entry['test_accuracy']:.4f}{note}")


@app.command()
@command_options(PRUNE_REQUEST)
def prune(**request) -> None:
    """Run the prune-version flow: keep a share of each conv's channels of a registered airbench version, fine-tune
    the smaller network with its recipe, and gate and register it like a training run."""
    require_keras("pruning")
    from flows.prune_version import check_plan
    from model_lib.prune import prunable

    check_plan(request)  # usage errors (exit 2) before Prefect starts
    version_dir = _version_dir(request["model"])
    prunable(version_dir, work_dir())  # an architecture prune does not take, a dataset not cached here
    target, keep = request["target_speedup"], request["keep"] or DEFAULT_KEEP
    share = f"the share of its channels that runs {target:g}x as fast" if target else f"{keep:.0%} of its channels"
    typer.echo(f"Pruning {version_dir} to {share} by {request['criterion']}, then fine-tuning; starting Prefect...",
               err=True)  # fmt: skip
    _stoppable("the prune-version run is marked Crashed; no version was registered (the same command resumes)")
    _require_prefect_api()
    from flows.prune_version import prune_version

    _console_without_expected_tracebacks()
    _import_tensorflow_quietly()
    result = prune_version(**request)
    _echo_registration(result, f", pruned from {result['pruned_from']}")


def _echo_registration(result: dict, lineage: str = "") -> None:
    """A training run's registration in three lines: the version, its marks and accuracy; where; the gate's word."""
    marks = ", ".join(["champion" if result["champion"] else "challenger", *filter(None, [result.get("alias")])])
    typer.echo(
        f"{result['name']} v{result['version']} ({marks}){lineage}: test accuracy {result['test_accuracy']:.4f}\n"
        f"  {result['location']}\n  gate: {result['reason']}"
    )


@app.command()
def watch(
    data: Annotated[str | None, typer.Option(help="Training data folder: new labelled images start a retrain.")] = None,
    inbox: Annotated[str | None, typer.Option(help="Inbox folder: new images start batch-predict for them.")] = None,
    quiet_seconds: Annotated[
        float, typer.Option(help="Seconds without changes that end a burst of files (one event per burst).")
    ] = QUIET_SECONDS,
    param: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=VALUE: a train-cifar parameter for the retrains --data starts (repeatable; "
            "the deployment's parameters fill in the rest), e.g. profile=fast."
        ),
    ] = None,
) -> None:
    """Watch folders and emit Prefect events that the deployments' triggers in prefect.yaml act on.

    Run it beside the worker (needs PREFECT_API_URL). Each burst of new or changed image files
    sends one event: `cifar-pipeline.training-data.changed` starts train-cifar/weekly-retrain,
    `cifar-pipeline.inbox.changed` starts batch-predict/on-demand for the burst's files.
    """
    from flows.watch import check_watch_request, retrain_parameters, watch_folders

    folders = check_watch_request(data, inbox, quiet_seconds)  # PREFECT_API_URL set, too
    parameters = retrain_parameters(param or [], folders.get("data"))
    _require_prefect_api()  # it answers: else the first burst's event would be lost after "Watching"
    watching = "Watching " + ", ".join(f"{role} {path}" for role, path in folders.items()) + " (Ctrl-C stops)"
    try:
        watch_folders(folders, quiet_seconds, log=typer.echo, parameters=parameters, ready=lambda: typer.echo(watching))
    except KeyboardInterrupt:
        typer.echo("stopped")


@app.command()
def serve() -> None:
    """Serve train-cifar (with its weekly schedule) and batch-predict from this process; no work pool.

    Uses the deployments declared in prefect.yaml. Needs a Prefect API (PREFECT_API_URL, e.g. a
    `prefect server start`) to see the schedule fire and to trigger runs from the UI or CLI.
    Refuses when `prefect deploy` already gave those deployments to a work pool.
    """
    from prefect import serve as prefect_serve

    from flows.serve import deployments_from_yaml, refuse_pool_deployments

    deployments = deployments_from_yaml()
    refuse_pool_deployments(deployments)
    prefect_serve(*deployments)


@app.command("app")
def app_command(
    model: Annotated[
        str, typer.Option(help="The reference served; an alias is followed when it moves.")
    ] = DEFAULT_MODEL,
    host: Annotated[str, typer.Option(help="Address to listen on; beyond loopback it needs a token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free one, printed).")] = APP_PORT,
    token: Annotated[
        str | None, typer.Option(envvar=TOKEN_ENV, help="Every /api/ call must carry it (Bearer).")
    ] = None,
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest request body, all its images together.")
    ] = MAX_UPLOAD_MB,
    max_megapixels: Annotated[float, typer.Option(help="Largest image, read from its header.")] = MAX_MEGAPIXELS,
    reload_seconds: Annotated[float, typer.Option(help="How often the reference is resolved again.")] = RELOAD_SECONDS,
    engine: EngineOption = ENGINES[0],
    allowed_hosts: Annotated[
        str,
        typer.Option(
            help="Names (comma-separated) clients may reach it by, beside loopback's and --host's; "
            "a wildcard --host answers any name unless these are given."
        ),  # fmt: skip
    ] = "",
) -> None:
    """Serve the HTTP prediction API and the web page (drag-and-drop, webcam, registry) until Ctrl-C."""
    from flows.app import AppSettings, host_name, is_loopback, listen

    names = tuple(name.strip() for name in allowed_hosts.split(",") if name.strip())
    if bad := [name for name in names if name != "*" and host_name(name) != name.lower().strip("[]")]:
        raise ConfigError(f"--allowed-hosts {bad[0]!r} is not a host name or address (no scheme, port or path)")
    wildcard = host in ("0.0.0.0", "::", "")
    hosts = (names or ("*",)) if wildcard else (host, *names)
    settings = AppSettings(model, artifacts_location(), token or None, max_upload_mb, max_megapixels,
                           reload_seconds, engine, hosts)  # fmt: skip
    if not is_loopback(host) and not settings.token:
        raise ConfigError(f"--host {host} listens beyond this machine: give a token (--token, or set "
                          f"{TOKEN_ENV}) that every API call must carry")  # fmt: skip
    for option, value in (("--max-upload-mb", max_upload_mb), ("--max-megapixels", max_megapixels),
                          ("--reload-seconds", reload_seconds)):  # fmt: skip
        check_number(option, value, **APP_BOUNDS[option])
    check_engine(engine)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535, not {port}")
    try:
        listener = listen(host, port)
    except OSError as error:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({error.strerror})") from None
    from flows.app import create_app, server_for
    from flows.live import LiveModel
    from model_lib.predict import resolve_model

    resolved = resolve_model(settings.model, settings.artifacts_root, settings.engine)  # checksums verified once
    if _keras_serves(resolved):
        _import_tensorflow_quietly()

    web = create_app(settings, LiveModel(settings.model, settings.artifacts_root, settings.engine, resolved))
    # uvicorn answers the signal (requests in flight get 5 s); our watcher stops their decoding at the next image
    # and ends the command as every other stops: one line, 130 or 143.
    _stoppable("requests in flight were answered 503 (the app is stopping)")
    host, port = listener.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    info = web.state.live.served.info
    typer.echo(f"serving {info.reference} ({info.version}) at http://{shown}:{port}/ - Ctrl-C stops")
    server_for(web).run(sockets=[listener])


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _require_reason(reason: str) -> None:
    if not reason.strip():
        raise ConfigError("--reason must say why the champion moves (it is kept in the history)")


def _version_dir(ref: str):
    """The version folder a reference names, or a clean CLI error."""
    from model_lib.registry import parse_reference
    from model_lib.versions import RegistryError

    try:
        return parse_reference(ref, artifacts_location())
    except RegistryError as error:
        _fail(str(error))


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of a table.")]


@models_app.command("list")
def models_list(name: ModelName = "cifar10", as_json: JsonOption = False) -> None:
    """Versions with alias marks, test accuracy and date."""
    from model_lib.registry import Registry

    registry = Registry(artifacts_location(), name)
    state = registry.state()
    if as_json:
        typer.echo(json.dumps({"name": name, "aliases": state["aliases"], "versions": state["versions"]}, indent=2))
        return
    if not state["versions"]:
        typer.echo(f"{name}: no versions registered under {registry.location}")
        return
    aliases = state["aliases"]
    typer.echo(f"{'version':>8}  {'aliases':<18} {'accuracy':>8}  {'created (UTC)':<25} architecture")
    for entry in state["versions"]:
        marks = ",".join(alias for alias, version in aliases.items() if version == entry["version"])
        accuracy = entry["test_accuracy"]
        shown = f"{accuracy:.4f}" if accuracy is not None else "-"
        pruned = f", pruned from {entry['pruned_from']}" if entry.get("pruned_from") else ""
        typer.echo(f"{'v' + str(entry['version']):>8}  {marks:<18} {shown:>8}  {entry['created_at']:<25} "
                   f"{entry['architecture']}{pruned}")  # fmt: skip


@models_app.command("show")
def models_show(ref: VersionRef, as_json: JsonOption = False) -> None:
    """The version's manifest (`--json`), or its headline figures."""
    from model_lib.fileio import read_json
    from model_lib.versions import MANIFEST_FILE

    version_dir = _version_dir(ref)
    manifest = read_json(version_dir / MANIFEST_FILE)
    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
        return
    metrics, data = manifest["metrics"], manifest["dataset"]
    calibration = manifest.get("calibration") or {}
    typer.echo(
        f"{manifest.get('name')} v{manifest['version']} ({manifest.get('architecture')}, {manifest['created_at']})\n"
        f"  test accuracy {metrics['test_accuracy']:.4f} on {data.get('test_count', '?')} images "
        f"(test set {str(data.get('test_fingerprint'))[:12]})\n"
        f"  calibrated: temperature {calibration.get('temperature', '-')}, "
        f"test ECE {calibration.get('test_ece_after', '-')}\n"
        f"  profile {manifest['config'].get('profile')}, {metrics.get('epochs_run', '?')} epochs\n"
        f"  {version_dir}  (--json for the whole manifest)"
    )


@models_app.command("compare")
def models_compare(
    first: Annotated[str, typer.Argument(help="A version: cifar10@v3, cifar10@champion or a folder.")],
    second: Annotated[str, typer.Argument(help="The version to compare it with.")],
    as_json: JsonOption = False,
) -> None:
    """Two versions side by side: metrics, per-class F1 changes, config differences, data fingerprints."""
    from model_lib.compare import compare_manifests, comparison_text
    from model_lib.fileio import read_json
    from model_lib.runs import PRUNING_FILE
    from model_lib.versions import MANIFEST_FILE

    folders = [_version_dir(ref) for ref in (first, second)]
    manifests = [read_json(folder / MANIFEST_FILE) for folder in folders]
    labels = [f"{m.get('name')} v{m.get('version')}" for m in manifests]
    pruning = None  # where one was pruned from the other: the two as timed together
    for folder, manifest, parent in zip(folders, manifests, labels[::-1], strict=True):
        if ((manifest.get("config") or {}).get("pruned") or {}).get("from") == parent:
            pruning = read_json(folder / PRUNING_FILE) if (folder / PRUNING_FILE).is_file() else None
    comparison = compare_manifests(*manifests, pruning)
    typer.echo(json.dumps(comparison, indent=2) if as_json else "\n".join(comparison_text(comparison)))


@models_app.command("verify")
def models_verify(ref: VersionRef) -> None:
    """Check every file's sha256 against the manifest, in the registry as it is now (an object store's files are
    downloaded again, not taken from this machine's copy); exits 1 on any mismatch."""
    from model_lib.registry import check_reference
    from model_lib.versions import RegistryError

    try:
        where, problems = check_reference(ref, artifacts_location())
    except RegistryError as error:
        _fail(str(error))
    for problem in problems:
        typer.echo(f"FAILED {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"OK {where}: every checksum matches")


@models_app.command("promote")
def models_promote(
    ref: Annotated[str, typer.Argument(help="cifar10@v3 (or name@latest).")],
    reason: Annotated[str, typer.Option(help="Why (required); recorded in the history.")],
) -> None:
    """Make a version champion by hand."""
    from model_lib.registry import Registry
    from model_lib.versions import RegistryError

    _require_reason(reason)
    model_name, _, tag = ref.partition("@")
    try:
        version = Registry(artifacts_location(), model_name or "cifar10").promote(tag or "latest", reason)
    except RegistryError as error:
        _fail(str(error))
    typer.echo(f"{model_name or 'cifar10'}@champion -> v{version}")


@models_app.command("rollback")
def models_rollback(
    reason: Annotated[str, typer.Option(help="Why (required); recorded in the history.")],
    name: ModelName = "cifar10",
) -> None:
    """Move champion back to the previous champion."""
    from model_lib.registry import Registry
    from model_lib.versions import RegistryError

    _require_reason(reason)
    try:
        version = Registry(artifacts_location(), name).rollback(reason)
    except RegistryError as error:
        _fail(str(error))
    typer.echo(f"{name}@champion -> v{version}")


@server_app.command("status")
def server_status() -> None:
    """Where this PREFECT_HOME's local Prefect server answers, if one runs."""
    state = local_server.status()
    where = local_server.home_folder()
    if state is None:
        typer.echo(f"no local Prefect server runs for {where} (the next train or predict starts one)")
        return
    typer.echo(f"{state['url']} (pid {state['pid']}; {where}; stops after {state['idle_seconds']:g} s unused)")


@server_app.command("stop")
def server_stop() -> None:
    """Stop this PREFECT_HOME's local Prefect server now (commands still using it lose their server)."""
    state = local_server.stop()
    typer.echo(f"stopped {state['url']} (pid {state['pid']})" if state else "no local Prefect server was running")
