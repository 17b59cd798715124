"""The batch-predict tasks: classify one shard of a folder; merge the shards' rows into the CSV."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from model_lib.predict import ModelInfo, classify_shard
from model_lib.prediction_csv import merge_parts
from model_lib.stores import open_store
from tasks.common import retry_on_transient_io


# NO_CACHE: the tasks write files that the flow deletes, so a cached result would point at nothing.
@task(
    name="classify-shard",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_transient_io,
    cache_policy=NO_CACHE,
)
def classify_shard_task(
    input_dir: str,
    shard_file: str,
    model: ModelInfo,
    part_path: str,
    top_k: int,
    batch_size: int,
    progress_key: str | None = None,
    time_limit: float | None = None,
) -> dict:
    """Decode and classify the shard saved in `shard_file`; broken files become error rows, never a failed task.

    The time limit is the shard's own, not Prefect's `timeout_seconds`: that cannot interrupt a task in a
    worker thread, which is where a shard runs.

    Args:
        input_dir: The folder the shard's paths are relative to.
        shard_file: The shard's entries, saved by the flow.
        model: The resolved model.
        part_path: Where the shard's CSV rows go.
        top_k: Ranked labels per row.
        batch_size: Images per decoding job and model call.
        progress_key: The flow's progress in this process (a bar or log lines), advanced per batch.
        time_limit: Seconds after which the shard stops and fails (ShardTimeout).
    """
    return classify_shard(input_dir, shard_file, model, part_path, top_k, batch_size, progress_key, time_limit)


@task(
    name="write-csv", retries=2, retry_delay_seconds=2, retry_condition_fn=retry_on_transient_io, cache_policy=NO_CACHE
)
def write_csv_task(part_paths: list[str], output_csv: str, top_k: int, class_count: int) -> str:
    """Concatenate the shards' rows in path order into a temporary file renamed over the output."""
    merge_parts(part_paths, Path(output_csv), top_k, class_count)
    return output_csv


@task(
    name="publish-csv",
    retries=2,
    retry_delay_seconds=2,
    retry_condition_fn=retry_on_transient_io,
    cache_policy=NO_CACHE,
)
def publish_csv_task(local_csv: str, url: str) -> str:
    """Upload the finished CSV to its object-store URL in one piece (readers never see a part of it)."""
    folder, _, name = url.rpartition("/")
    open_store(folder).upload(Path(local_csv), name)
    return url
