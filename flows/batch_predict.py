"""The `batch-predict` flow: classify a folder of images into a CSV with a registered model."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from flows.surfaces import flow_parameters
from model_lib.config import ConfigError
from model_lib.predict import (
    image_like_entries,
    plan_request,
    shards,
    start_local_workers,
    write_shard,
)
from model_lib.prediction_csv import claim_output
from model_lib.progress import Progress, register, unregister
from model_lib.requests import PREDICT_REQUEST, parameter_names, with_defaults
from model_lib.settings import INBOX_FOLDER, artifacts_location, is_url
from tasks.common import KEPT_RESULTS, check_deployment_storage, finished, in_parameter_words
from tasks.prediction import classify_shard_task, publish_csv_task, write_csv_task

CONCURRENT_SHARDS = 2  # thread-pool default: one shard decodes while the other predicts
# A shard's time limit: generous (the slowest measured path, six-view TTA through Keras on 2 cores,
# takes under 0.01 s an image), so it ends a stuck shard, never a slow machine's.
SHARD_SECONDS_PER_IMAGE = 0.5
SHARD_TIMEOUT_FLOOR_SECONDS = 600  # the model's load and first compilation come on top


class PredictionErrors(RuntimeError):
    """Raised after the CSV is written when `fail_on_error` is set and some files failed."""


@flow(name="batch-predict", task_runner=ThreadPoolTaskRunner(max_workers=CONCURRENT_SHARDS), **KEPT_RESULTS)
@in_parameter_words(parameter_names(PREDICT_REQUEST))
@flow_parameters(PREDICT_REQUEST)
def batch_predict(**request) -> dict:
    """Classify every image under `input_dir` into a CSV; returns the run's summary.

    Broken files get error rows and the run goes on. The model registry, folders and image files
    are never written. Each ok row's `flag` is `out_of_distribution` (the image's texture is unlike
    the training images', or what the network computes from it lies far from every class: model_lib/flags.py),
    `low_confidence` (calibrated confidence below the model's threshold) or
    `ok`.
    """
    request = with_defaults(PREDICT_REQUEST, request)
    top_k, batch_size, shard_size = request["top_k"], request["batch_size"], request["shard_size"]
    logger = get_run_logger()
    started = time.perf_counter()
    check_deployment_storage()
    request["input_dir"] = request["input_dir"] or default_inbox()
    plan = plan_request(request, artifacts_location())
    root, output, model_info = plan.root, plan.output, plan.model
    output.parent.mkdir(parents=True, exist_ok=True)
    parts_dir = claim_output(output)  # refuses, before any work, an output another live run is writing
    for note in model_info.notes:
        logger.warning(note)
    logger.info(f"Classifying {root} with {model_info.version} into {output}")

    if isinstance(FlowRunContext.get().task_runner, ThreadPoolTaskRunner):
        start_local_workers(model_info)  # shards run in this process: warm it up while the folder is walked

    skipped: list[str] = []
    progress_key = parts_dir.name  # unique per run: shard tasks in this process find the run's progress
    progress = Progress("classifying images", 0, "images", logger.info)  # the total grows as the walk goes
    register(progress_key, progress)
    futures, parts = [], []
    try:
        entries = image_like_entries(root, request["recursive"], skipped)
        if request["files"] is not None:
            wanted = set(request["files"])
            entries = (entry for entry in entries if entry.relative_path in wanted)
        for index, shard in enumerate(shards(entries, shard_size)):
            shard_file = parts_dir / f"{index:06d}.json"
            write_shard(shard, shard_file)
            parts.append(str(parts_dir / f"{index:06d}.csv"))
            progress.add_total(len(shard))
            limit = max(SHARD_TIMEOUT_FLOOR_SECONDS, SHARD_SECONDS_PER_IMAGE * len(shard))
            futures.append(
                classify_shard_task.submit(
                    str(root), str(shard_file), model_info, parts[-1], top_k, batch_size, progress_key, limit
                )
            )
        counts = [future.result() for future in futures]
        write_csv_task(parts, str(output), top_k, len(model_info.class_names))
        if plan.publish_to:
            publish_csv_task(str(output), plan.publish_to)
    finally:
        for future in futures:  # on a failure or a stop, let running shards end before their folder goes
            with contextlib.suppress(BaseException):  # wait() re-raises what ended the shard: not our concern here
                future.wait()
        unregister(progress_key)
        progress.close()
        shutil.rmtree(parts_dir, ignore_errors=True)

    seconds = time.perf_counter() - started
    ok, errors = sum(c["ok"] for c in counts), sum(c["error"] for c in counts)
    flagged = sum(c["flagged"] for c in counts)
    destination = plan.publish_to or str(output)
    summary = {
        "output_csv": destination,
        "model": model_info.version,
        "ok": ok,
        "flagged": flagged,
        "error": errors,
        "skipped": len(skipped),
        "seconds": round(seconds, 2),
        "images_per_second": round((ok + errors) / seconds, 1) if seconds else 0.0,
    }
    logger.info(
        f"{ok} ok ({flagged} flagged unsure), {errors} error, {len(skipped)} skipped in {seconds:.1f}s "
        f"({summary['images_per_second']} images/s) with {model_info.version}"
    )
    create_link_artifact(
        key="batch-predict-csv",
        link=plan.publish_to or output.as_uri(),
        link_text=output.name,
        description=f"Predictions for {root}",
    )
    create_markdown_artifact(
        key="batch-predict-summary",
        markdown="\n".join(
            ["# Batch prediction", "", "| | |", "|---|---|"]
            + [f"| {key} | {value} |" for key, value in summary.items()]
        ),
        description=f"{ok} ok ({flagged} flagged unsure), {errors} error, {len(skipped)} skipped",
    )
    if request["fail_on_error"] and errors:
        raise PredictionErrors(f"{errors} file(s) could not be classified; see the error rows in {destination}")
    # The state's message says the outcome in the UI's run list; the caller gets the summary.
    return finished(f"{ok} ok ({flagged} flagged unsure), {errors} error -> {destination}", summary)


def default_inbox() -> str:
    """ARTIFACTS_DIR/inbox, the folder a run without `input_dir` classifies.

    Raises:
        ConfigError: It does not exist (a local one), naming the parameter to pass instead.
    """
    inbox = f"{artifacts_location()}/{INBOX_FOLDER}"
    if not is_url(inbox) and not Path(inbox).is_dir():
        raise ConfigError(
            f"input_dir: not given, and the default inbox {inbox} does not exist (create it, or pass input_dir)"
        )
    return inbox


def with_dask(address: str | None = None, workers: int | None = None):
    """`batch_predict` on Dask: a scheduler at `address`, or a local cluster of `workers` processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1})
    return batch_predict.with_options(task_runner=runner)
