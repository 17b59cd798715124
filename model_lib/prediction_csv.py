"""The prediction CSV: its columns, spreadsheet-safe cells, where it goes, what it may replace, and
reading it back.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path

from model_lib.config import ConfigError, option
from model_lib.fileio import atomic_open, owned_folder, remove_abandoned, seconds_since_written
from model_lib.images import is_image_name
from model_lib.settings import REGISTRY_FOLDER, is_url
from model_lib.stores import open_store


def check_output(output: Path, artifacts_root: str | os.PathLike, overwrite: bool) -> None:
    """Refuse an output that would destroy what the tool did not write.

    Never inside the model registry, never an image-like name (an input image), never a folder;
    an existing file only when it is an earlier prediction CSV, unless `overwrite`.
    """
    registry = None if is_url(artifacts_root) else (Path(artifacts_root) / REGISTRY_FOLDER).resolve()
    if registry is not None and output.is_relative_to(registry):
        raise ConfigError(f"{output}: inside the model registry ({registry}); write the CSV elsewhere")
    if output.is_dir():
        raise ConfigError(f"{output}: is a folder; {option('output')} takes a CSV file path")
    if output.exists() and not output.is_file():  # a device, FIFO or socket: replacing it is never asked for
        raise ConfigError(
            f"{output}: not a regular file (a device, FIFO or socket); {option('output')} takes a CSV file path"
        )
    if is_image_name(output.name):
        raise ConfigError(f"{output}: an image file name; {option('output')} takes a CSV file path")
    if output.exists() and not overwrite and not is_prediction_csv(output):
        raise ConfigError(
            f"{output}: exists and is not a prediction CSV written by this tool; refusing to overwrite it "
            f"(choose another {option('output')}, or pass {option('overwrite')})"
        )


class OutputBusy(RuntimeError):
    """Another run is writing the same output file."""


PARTS_INFIX = ".parts-"  # a run's shard files live in `.<output name>.parts-<id>-<process>/` beside the output
STALE_PARTS_SECONDS = 3600  # a parts folder untouched this long is a dead run's, even one on another machine


def claim_output(output: Path) -> Path:
    """Create this run's parts folder beside `output`; it also claims the output for this run.

    Two runs given the same `--output` would otherwise both report it as theirs while one result
    is lost. Of the live runs' parts folders (a dead process's are removed first; another
    machine's count until untouched for `STALE_PARTS_SECONDS`), the oldest wins: every run sees
    the same folders, so exactly one goes on, and a later one ends before any work.

    Raises:
        OutputBusy: An earlier run that is still alive is writing `output`; names the file and what to do.
    """
    prefix = f".{output.name}{PARTS_INFIX}"
    remove_abandoned(output.parent, prefix)
    mine = owned_folder(output.parent, prefix)
    rivals = [
        folder
        for folder in output.parent.glob(f"{prefix}*")
        if folder != mine
        and folder.is_dir()
        and (age := seconds_since_written(folder)) is not None
        and age < STALE_PARTS_SECONDS
    ]
    if rivals and min(folder.name for folder in rivals) < mine.name:
        shutil.rmtree(mine, ignore_errors=True)
        raise OutputBusy(f"{output}: another prediction run is writing this file now; wait for it to finish "
                         f"or choose another {option('output')}")  # fmt: skip
    return mine


def check_remote_output(output: str, overwrite: bool) -> None:
    """Refuse an object-store output inside a registry, with an image's name, or existing (unless `overwrite`)."""
    folder, _, name = output.rstrip("/").rpartition("/")
    if f"/{REGISTRY_FOLDER}/" in f"{folder}/":
        raise ConfigError(f"{output}: inside a model registry (a models/ folder); write the CSV elsewhere")
    if is_image_name(name) or not name:
        raise ConfigError(f"{output}: not a CSV file name; {option('output')} takes a CSV file path")
    store = open_store(folder)
    store.check()  # a missing bucket now, not after the whole run
    if not overwrite and store.exists(name):
        raise ConfigError(
            f"{output}: exists; refusing to overwrite it (choose another {option('output')}, or pass "
            f"{option('overwrite')})"
        )


def is_prediction_csv(path: Path) -> bool:
    """Whether `path` starts with the header this tool writes."""
    prefix = ",".join(csv_columns(1)[:4])
    with open(path, "rb") as handle:
        return handle.read(len(prefix)) == prefix.encode()


def ranked_columns(top_k: int) -> list[str]:
    """The ranked predictions' columns: `top1_label`, `top1_probability`, `top2_label`, ..."""
    return [name for rank in range(1, top_k + 1) for name in (f"top{rank}_label", f"top{rank}_probability")]


def csv_columns(top_k: int) -> list[str]:
    """The CSV's columns in order, for `top_k` ranked predictions: the one definition of its shape."""
    ranked = ranked_columns(top_k)
    return ["path", "status", "label", "confidence", "flag", *ranked, "width", "height", "error", "model"]


def csv_row(columns: list[str], **cells: str | int) -> list:
    """One row in the order of `columns` (from `csv_columns`); a column not given is empty."""
    return [cells.get(column, "") for column in columns]


SPREADSHEET_TRIGGERS = ("=", "+", "-", "@", "\t", "\r", "'")  # a leading one makes a spreadsheet evaluate a cell


def csv_text(value: str) -> str:
    """A text cell that is safe in a spreadsheet and valid UTF-8.

    OWASP's rule for CSV injection: a cell starting with `=`, `+`, `-`, `@`, tab or CR gets a
    leading `'`, so Excel, LibreOffice and Google Sheets show it as text instead of running it as
    a formula. A cell starting with `'` gets one too, so `read_predictions` can undo it exactly.
    Bytes of a file name that are not UTF-8 are written as `\\xNN` escapes, and a backslash as two, so
    every name has one cell and every cell one name (a file literally named `\\xe9` is `\\\\xe9`).
    """
    if "\\" in value:
        value = value.replace("\\", "\\\\")
    if not value.isascii() and any("\udc80" <= c <= "\udcff" for c in value):  # os.fsdecode's escapes
        value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "'" + value if value.startswith(SPREADSHEET_TRIGGERS) else value


def read_predictions(path: str | Path):
    """A prediction CSV as a pandas DataFrame, with the text cells as they were before `csv_text`.

    `width` and `height` are integers (pandas' nullable Int64); error rows have them empty (NA),
    and their labels empty and probabilities NaN.
    """
    import pandas as pd

    header = pd.read_csv(path, nrows=0).columns
    text = [c for c in header if c in ("path", "status", "label", "flag", "error", "model") or c.endswith("_label")]
    # Only empty cells are missing (a file "NA.png" stays a name), and labels stay text ("01" is no 1).
    dtypes = {**{column: str for column in text}, "width": "Int64", "height": "Int64"}
    table = pd.read_csv(path, dtype=dtypes, keep_default_na=False, na_values=[""])
    for column in text:
        table[column] = table[column].fillna("").map(_undo_csv_text)
    return table


_ESCAPES = re.compile(r"\\(\\|x[0-9a-f]{2})")  # what csv_text wrote for a backslash or an undecodable byte


def _undo_csv_text(cell):
    if isinstance(cell, str) and len(cell) > 1 and cell[0] == "'" and cell[1] in "".join(SPREADSHEET_TRIGGERS):
        cell = cell[1:]
    if isinstance(cell, str) and "\\" in cell:  # back to the name os.fsdecode gave (undecodable bytes as surrogates)
        cell = _ESCAPES.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)), cell)
    return cell


def merge_parts(part_paths: list[str], output_csv: Path, top_k: int, class_count: int) -> None:
    """Concatenate part files in order under a header, atomically replacing `output_csv`."""
    with atomic_open(output_csv, "w", newline="", encoding="utf-8") as out:
        csv.writer(out).writerow(csv_columns(min(top_k, class_count)))
        for part in part_paths:
            with open(part, encoding="utf-8", newline="") as handle:
                while chunk := handle.read(1 << 20):
                    out.write(chunk)


def default_output_csv(artifacts_root: str | os.PathLike, folder_name: str) -> str:
    """`ARTIFACTS_DIR/predictions/<folder name>-<UTC time>-<random>.csv`: one per run, never colliding,
    sorting by time (a URL when `ARTIFACTS_DIR` is an object store)."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    name = f"{folder_name or 'root'}-{stamp}-{uuid.uuid4().hex[:6]}.csv"
    return f"{str(artifacts_root).rstrip('/')}/predictions/{name}"
