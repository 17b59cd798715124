"""Which file of a registered version serves a prediction, read from its manifest alone: the fastest export of the
engine's that passed parity with the Keras model, the first view exported beside it, the feature rule each
serves with, and the cascade's rule. `export` writes what these read; `predict` and the app follow them."""

from __future__ import annotations

# Per engine, the export formats it serves, fastest first where `export` has not timed them on this host. `auto`:
# int8 TFLite ran 3.2x Keras on 2 cores, TFLite float32 1.5x ONNX float32 (bench/RESULTS.md).
TFLITE_FORMATS = ("float32", "float16", "int8")
ONNX_FORMATS = ("onnx", "onnx_int8")  # with the `onnx` extra (`model_lib.onnx_export`)
EXPORT_FORMATS = TFLITE_FORMATS + ONNX_FORMATS
DEFAULT_FORMATS = TFLITE_FORMATS  # what `export` and `train --export` write unless told
EXPORT_SUFFIXES = (".tflite", ".onnx")  # the files of exports, which `--model` may name directly
SERVING_ORDER = {"auto": ("int8", "float16", "float32", "onnx_int8", "onnx"), "onnx": ("onnx_int8", "onnx")}
# A format timed faster than SERVING_ORDER's first by `export` on this host serves first only beyond this ratio: two
# formats within it (float16 and float32 on a CPU) keep the fixed order rather than swap with each export's noise.
MEASURED_MARGIN = 1.25
FEATURE_MIN_AGREEMENT = 0.995  # share of test images an export's feature-space flags must share with Keras' to serve


def cascade_rule(manifest: dict) -> tuple[float, float] | None:
    """`(temperature scale, margin)` for serving a version first view first (`model_lib.inference.cascade`): the
    calibrated temperature over the first view's own, and the margin calibration chose; None unless calibration
    found that served so it keeps accuracy (then int8, which only adds error, is not tried either)."""
    calibration = manifest.get("calibration") or {}
    record = calibration.get("cascade") or {}
    if not record.get("serves"):
        return None
    return calibration["temperature"] / record["first_view_temperature"], record["margin"]


def _records(entry: dict) -> tuple[dict, dict]:
    """A manifest's export entry and the record of the first view exported beside it ({} without one)."""
    return entry, entry.get("first_view") or {}


def export_files(entry: dict) -> tuple[str, ...]:
    """The files of a manifest's export entry: the export, the first view exported beside it if any, and their own
    feature rules."""
    names = ((record.get("file"), (record.get("features") or {}).get("file")) for record in _records(entry))
    return tuple(name for pair in names for name in pair if name)


def serving_exports(manifest: dict, engine: str = "auto", host: str | None = None) -> list[str]:
    """The files of the exports recorded in a version's manifest that passed parity and `engine` serves, fastest
    first: SERVING_ORDER's, unless `export` timed every one of them on this host (`host`: its machine key) and one
    ran over MEASURED_MARGIN times the first's images/s there; then that one comes first."""
    entries = {entry["format"]: entry for entry in manifest.get("exports", []) if entry.get("parity")}
    listed = set(manifest["files"])
    order = [fmt for fmt in SERVING_ORDER.get(engine, ()) if fmt in entries and entries[fmt]["file"] in listed]
    if order:
        if host is None:
            from model_lib.precision import machine_key

            host = machine_key()
        speeds = {fmt: entries[fmt].get("images_per_second") for fmt in order if entries[fmt].get("host") == host}
        if len(speeds) == len(order) and all(speeds.values()):
            fastest = max(order, key=speeds.get)
            if speeds[fastest] > MEASURED_MARGIN * speeds[order[0]]:
                order = [fastest, *(fmt for fmt in order if fmt != fastest)]
    return [entries[fmt]["file"] for fmt in order]


def serving_export(manifest: dict, engine: str = "auto", host: str | None = None) -> str | None:
    """The file of the fastest export that passed parity and `engine` serves, or None (`serving_exports`)."""
    return next(iter(serving_exports(manifest, engine, host)), None)


def export_feature_rule(manifest: dict, file: str) -> tuple[str, str]:
    """`(rule file, "")`: the feature rule an export `file` (or a first view exported beside one) serves with; or
    `("", why not)`: it was exported before exports had features, or its rule's flags disagreed with the Keras
    model's."""
    records = [record for entry in manifest.get("exports", []) for record in _records(entry)]
    features = next((record.get("features") for record in records if record.get("file") == file), None)
    if not features or "file" not in features:
        return "", f"{file} reports no features (exported before exports did; running export again adds them)"
    if not features["parity"]:
        return "", (f"{file}'s features flag as the Keras model's on {features['agreement']:.1%} of the test images "
                    f"(under {FEATURE_MIN_AGREEMENT:.1%})")  # fmt: skip
    return features["file"], ""


def served_first_view(manifest: dict, export: str) -> str | None:
    """The file of the first view exported beside `export` if it passed parity and the manifest lists it, else None."""
    entry = next((entry for entry in manifest.get("exports", []) if entry["file"] == export), {})
    view = entry.get("first_view") or {}
    return view["file"] if view.get("parity") and view["file"] in manifest["files"] else None
