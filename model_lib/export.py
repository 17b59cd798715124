"""Export: TFLite float32, float16 and full-integer int8, and ONNX float32 and int8 (`model_lib.onnx_export`), beside
a registered version, with measured accuracy.

Each export's test accuracy is measured with the engine that serves it (the LiteRT interpreter, ONNX Runtime) on the
version's own test set
(the cached dataset its manifest names); an int8 model more than `INT8_MAX_DROP` below its own float32
is recorded as failed, with the reason. An export passes parity when it is within
`PARITY_MAX_DROP` of the Keras model's test accuracy and gives the same top-1 label on at least
`PARITY_MIN_AGREEMENT` of the test images: batch prediction then runs the fastest such export
in place of the Keras model (`model_lib.serving`).

A TTA model that calibration found may be served first view first (`model_lib.calibrate`) also gets its first
view (the network inside the TTA wrapper) in int8 beside the int8 export: the same cascade, served over TFLite,
measured on the test set against the Keras model like any export.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from model_lib.config import ConfigError
from model_lib.data import cached_dataset, load_arrays
from model_lib.fileio import read_json
from model_lib.inference import (
    CASCADE_TOLERANCE,
    KerasClassifier,
    TFLiteClassifier,
    cascade,
    export_classifier,
    sharpened,
)
from model_lib.models import served_with_features, unwrap_tta, with_features
from model_lib.onnx_export import convert_onnx, quantize_onnx, require_onnx
from model_lib.ood import OOD_FILE, FeatureRule, classified, fit_feature_rule
from model_lib.precision import machine_key
from model_lib.registry import attach_to_version
from model_lib.serving import (
    DEFAULT_FORMATS,
    EXPORT_FORMATS,
    FEATURE_MIN_AGREEMENT,
    ONNX_FORMATS,
    cascade_rule,
    export_files,
)
from model_lib.split import Split, run_split
from model_lib.versions import MANIFEST_FILE, load_verified_model, verify_version

INT8_REFERENCE = {"int8": "float32", "onnx_int8": "onnx"}  # each int8 export against its own float32
INT8_MAX_DROP = 0.01  # int8 may lose at most one point of test accuracy against float32
CALIBRATION_IMAGES = 200  # training images the int8 quantiser calibrates its ranges on
PARITY_MAX_DROP = 0.003  # test accuracy an export may lose against the Keras model and still serve
PARITY_MIN_AGREEMENT = 0.98  # share of test images on which an export that serves matches Keras' top-1
FIRST_VIEW_FORMAT = "int8"  # the format whose export a TTA model's first view is exported beside
SPEED_IMAGES = 512  # test images (repeated where there are fewer) each export is timed on, for `auto`'s order
SPEED_PASSES = 2  # timed passes over them after a warm-up; the faster counts


def export_file(export_format: str) -> str:
    """The file name of an export in a version folder."""
    if export_format in ONNX_FORMATS:
        return "model.onnx" if export_format == "onnx" else f"model_{export_format.removeprefix('onnx_')}.onnx"
    return f"model_{export_format}.tflite"


def first_view_file(export_format: str) -> str:
    """The file name of a TTA model's first view exported beside the export of `export_format`."""
    return f"model_{export_format}_first_view.tflite"


def check_formats(formats: tuple[str, ...]) -> None:
    """Raises ConfigError for an export format that does not exist, or an ONNX one this install cannot write, before
    any model is loaded."""
    unknown = [export_format for export_format in formats if export_format not in EXPORT_FORMATS]
    if unknown or not formats:
        raise ConfigError(f"--formats {','.join(formats)}: choose from {', '.join(EXPORT_FORMATS)}")
    if set(formats) & set(ONNX_FORMATS):
        require_onnx(f"--formats {','.join(formats)}")


def require_tensorflow_backend() -> None:
    """Exports convert with TensorFlow's TFLite converter, which takes only a TensorFlow-backend model.

    Raises:
        ConfigError: Keras runs on another backend in this process (KERAS_BACKEND).
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ConfigError(
            f"TFLite exports need Keras on TensorFlow, and KERAS_BACKEND is {keras.backend.backend()}: run the export "
            "without KERAS_BACKEND (a model trained on any backend loads there): cifar-pipeline export REF"
        )


def write_saved_model(model, directory: Path) -> Path:
    """Write the SavedModel that `TFLiteConverter.from_keras_model` writes for a Keras 3 functional
    model (a `serve` endpoint calling it with training off, on its inputs' specs) once, so that every
    format converts from one tracing: `from_keras_model` traces and saves the model again for each.

    Returns:
        `directory`.
    """
    import functools

    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = [tf.TensorSpec(x.shape, dtype=x.dtype, name=x.name) for x in model.inputs]
    archive.add_endpoint("serve", functools.partial(model.__call__, training=False), signature)
    archive.write_out(str(directory), verbose=False)
    return directory


def convert(saved_model: Path, export_format: str, calibration_images: np.ndarray) -> bytes:
    """A model as TFLite bytes in `float32`, `float16` or full-integer `int8` (uint8 pixels in).

    Args:
        saved_model: The model's folder from `write_saved_model`.
        export_format: One of `EXPORT_FORMATS`.
        calibration_images: Images the int8 quantiser measures its ranges on.
    """
    import tensorflow as tf

    return run_converter(tf.lite.TFLiteConverter.from_saved_model(str(saved_model)), export_format, calibration_images)


def run_converter(converter, export_format: str, calibration_images: np.ndarray) -> bytes:
    """Set `converter` (a `tf.lite.TFLiteConverter`) up for `export_format` and run it: TFLite bytes."""
    import tensorflow as tf

    if export_format == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif export_format == "int8":
        samples = np.asarray(calibration_images, np.float32)

        def representative():
            for image in samples:
                yield [image[None]]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8  # raw pixels 0-255 go straight in
        converter.inference_output_type = tf.uint8
    elif export_format != "float32":
        raise ValueError(f"unknown export format {export_format!r}; choose from {', '.join(EXPORT_FORMATS)}")
    return converter.convert()


def export_version(
    version_dir: Path,
    artifacts_root: Path,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    log: Callable[[str], None] = print,
    force: bool = False,
    kept: dict[str, dict] | None = None,
) -> list[dict]:
    """Write exports beside a registered version and record them in its manifest.

    A format already exported and intact (its checksum matches the manifest) is kept, not converted
    again, unless `force`: running `export` after `train --export` costs a second. `kept`: what
    `exports_kept` said of these formats, where the caller asked already (its files are not hashed again).

    Returns:
        The manifest's `exports` entries of `formats`: format, file, size, sha256, test accuracy,
        agreement with the Keras model, status, reason, parity.

    Raises:
        FileNotFoundError: The version's cached dataset is gone (run ingest on the same data again).
        ConfigError: Keras does not run on TensorFlow here, or a format is unknown.
    """
    import tempfile

    check_formats(formats)
    manifest = read_json(version_dir / MANIFEST_FILE)
    layers = _scored_layers(manifest)
    kept = exports_kept(version_dir, formats, force) if kept is None else kept
    to_do = [export_format for export_format in formats if export_format not in kept]
    if not to_do:
        log(f"{version_dir}: {', '.join(formats)} already exported, checksums verified (--force exports again)")
        return [kept[export_format] for export_format in formats]
    require_tensorflow_backend()
    fingerprint = manifest["dataset"]["fingerprint"]
    dataset = cached_dataset(artifacts_root, fingerprint, "exports can be calibrated and measured")
    arrays = load_arrays(dataset.cache_dir)
    log(f"Exporting {version_dir}: the Keras model's labels on {len(arrays.y_test)} test images first, then "
        f"{', '.join(to_do)}, each measured on them")  # fmt: skip
    replaced = tuple(name for fmt in to_do for export in (export_file(fmt), first_view_file(fmt))
                     for name in (export, feature_rule_file(export)))  # fmt: skip
    model = load_verified_model(version_dir, replacing=replaced)
    calibration = np.asarray(arrays.x_train[:: max(1, len(arrays.y_train) // CALIBRATION_IMAGES)][:CALIBRATION_IMAGES])
    x_test, y_test = np.asarray(arrays.x_test), np.asarray(arrays.y_test)
    keras_top1 = KerasClassifier(model).predict(x_test).argmax(axis=1)
    keras_accuracy = float((keras_top1 == y_test).mean())
    network, views = unwrap_tta(model)
    rule = cascade_rule(manifest) if views else None
    # Where the version has a feature rule, each export reports the image's own features too, with a rule fitted on
    # its own features: int8's differ from Keras' enough to move a rule fitted on those (bench/RESULTS.md).
    check_features = partial(
        export_features, check=_feature_check(version_dir, manifest, layers, network, arrays, x_test)
    )
    entries, files, input_dtypes, outputs = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        exported = served_with_features(model, layers) if layers else model
        saved_model = write_saved_model(exported, Path(scratch) / "saved_model")
        for export_format in to_do:
            path = Path(scratch) / export_file(export_format)
            if export_format in ONNX_FORMATS:
                _write_onnx(path, export_format, saved_model, calibration)
            else:
                path.write_bytes(convert(saved_model, export_format, calibration))
            classifier = export_classifier(path)
            outputs[export_format], features = classified(classifier, x_test)
            speed = images_per_second(classifier, x_test)
            input_dtypes[path.name] = classifier.input_dtype
            top1 = outputs[export_format].argmax(axis=1)
            accuracy, agreement = float((top1 == y_test).mean()), float((top1 == keras_top1).mean())
            entries.append({"format": export_format, "file": path.name, "size_bytes": path.stat().st_size,
                            "test_accuracy": accuracy, "agreement": agreement, "status": "ok", "reason": "",
                            "images_per_second": round(speed, 1), "host": machine_key(),
                            **check_features(classifier, path, features)})  # fmt: skip
            files[path.name] = path
            log(f"{export_format}: {path.stat().st_size / 1e6:.2f} MB, {speed:,.0f} images/s here, test accuracy "
                f"{accuracy:.4f} (Keras {keras_accuracy:.4f}), same top-1 as Keras on {agreement:.2%}"
                f"{_said(entries[-1])}")  # fmt: skip
        measured = {entry["format"]: entry["test_accuracy"] for entry in [*kept.values(), *entries]}
        for entry in entries:
            float_format = INT8_REFERENCE.get(entry["format"])
            reference = measured.get(float_format, keras_accuracy)
            if entry["format"] == "int8" and input_dtypes[entry["file"]] != np.uint8:
                # The converter falls back to float silently, e.g. when weights hold NaN or inf.
                entry["status"] = "failed"
                entry["reason"] = "the converter left the model unquantized (non-finite weights or unsupported ops)"
                log(f"int8 export marked failed: {entry['reason']}")
            elif float_format and entry["test_accuracy"] < reference - INT8_MAX_DROP:
                entry["status"] = "failed"
                entry["reason"] = (
                    f"{entry['format']} test accuracy {entry['test_accuracy']:.4f} is more than {INT8_MAX_DROP:.0%} "
                    f"below {float_format if float_format in measured else 'Keras'}'s {reference:.4f}"
                )
                log(f"{entry['format']} export marked failed: {entry['reason']}")
            entry["parity"] = (
                entry["status"] == "ok"
                and entry["test_accuracy"] >= keras_accuracy - PARITY_MAX_DROP
                and entry["agreement"] >= PARITY_MIN_AGREEMENT
            )
            if entry["format"] == FIRST_VIEW_FORMAT and entry["status"] == "ok" and rule is not None:
                path = Path(scratch) / first_view_file(FIRST_VIEW_FORMAT)
                first_view = with_features(network, layers) if layers else network
                saved_network = write_saved_model(first_view, Path(scratch) / "first_view")
                path.write_bytes(convert(saved_network, FIRST_VIEW_FORMAT, calibration))
                entry["first_view"] = first_view_record(path, x_test, outputs[FIRST_VIEW_FORMAT], rule, entry["parity"],
                                                        y_test, keras_top1, check_features)  # fmt: skip
                view = entry["first_view"]
                served = "" if view["parity"] else "; not served"
                log(f"{FIRST_VIEW_FORMAT} first view first, every view for the {view['every_view_share']:.1%} it "
                    f"leaves unsure: test accuracy {view['test_accuracy']:.4f} (Keras {keras_accuracy:.4f}), "
                    f"same top-1 as Keras on {view['agreement']:.2%}{served}{_said(view)}")  # fmt: skip
        files.update({name: Path(scratch) / name for entry in entries for name in export_files(entry)})
        # Formats not redone (exported earlier, or not asked for now) stay listed.
        checksums = attach_to_version(version_dir, files, "exports", entries, merge_on="format")
    by_format = {**kept, **{entry["format"]: {**entry, "sha256": checksums[entry["file"]]} for entry in entries}}
    return [by_format[export_format] for export_format in formats]


def images_per_second(classifier, images: np.ndarray) -> float:
    """An export's images/s here, features included as served: SPEED_IMAGES test images (repeated where there are
    fewer: a dozen take too little time to tell formats apart), the faster of SPEED_PASSES after a warm-up."""
    sample = np.resize(images, (SPEED_IMAGES, *images.shape[1:]))  # whole images, repeated in order
    classifier.classify(sample[:64])  # the interpreter's first call allocates: not timed
    fastest = float("inf")
    for _ in range(SPEED_PASSES):
        started = time.perf_counter()
        classified(classifier, sample)
        fastest = min(fastest, time.perf_counter() - started)
    return SPEED_IMAGES / fastest


def _write_onnx(path: Path, export_format: str, saved_model: Path, calibration: np.ndarray) -> None:
    """Write the ONNX export of `export_format` at `path`: the float32 ONNX model converted from a float32 TFLite
    conversion (this run's, where it made one), and for int8 that model quantised. Both start from the scratch
    folder's files, so asking for float32, onnx and onnx_int8 converts each step once."""
    scratch = path.parent
    float_onnx = scratch / export_file("onnx")
    if not float_onnx.exists():
        tflite = scratch / export_file("float32")
        if not tflite.exists():
            tflite = scratch / "onnx_source.tflite"  # not registered: float32 was not asked for
            tflite.write_bytes(convert(saved_model, "float32", calibration))
        convert_onnx(tflite, float_onnx)
    if export_format == "onnx_int8":
        quantize_onnx(float_onnx, path, calibration)


def exports_kept(version_dir: Path, formats: tuple[str, ...], force: bool = False) -> dict[str, dict]:
    """The manifest's export entries of `formats` that stand as they are, by format: intact (checksums verified), and
    with what exports record now (a TTA model's first view, the features). The others need converting. Reads the
    manifest and the files only, so `export` after `train --export` needs no TensorFlow."""
    manifest = read_json(version_dir / MANIFEST_FILE)
    kept = {} if force else _intact_exports(version_dir, manifest, formats)
    earlier = kept.get(FIRST_VIEW_FORMAT, {})
    if earlier.get("status") == "ok" and "first_view" not in earlier and cascade_rule(manifest):
        del kept[FIRST_VIEW_FORMAT]  # exported before first views were: once more, with its first view
    if _scored_layers(manifest):  # exported before exports reported features: once more, with them
        kept = {fmt: entry for fmt, entry in kept.items() if "features" in entry}
    return kept


def first_view_record(
    path: Path, images: np.ndarray, every_view: np.ndarray, rule: tuple[float, float], every_view_parity: bool,
    labels: np.ndarray, keras_top1: np.ndarray, check_features: Callable[..., dict],
) -> dict:  # fmt: skip
    """The first view's export at `path` served first, `every_view` (the export's outputs on `images`) for the images
    it leaves unsure, under `rule` (`cascade_rule`): its file, size, test accuracy, agreement with the Keras model,
    share of images every view re-ran, and parity: within `CASCADE_TOLERANCE` of the Keras model's accuracy and
    `PARITY_MIN_AGREEMENT` of its labels, over an export that passed parity itself; and what `check_features` says
    of the features it reports (`export_features`)."""
    scale, margin = rule
    classifier = TFLiteClassifier(path)
    probabilities, features = classified(classifier, images)
    first = sharpened(probabilities, scale)
    served, unsure = cascade(first, lambda rows: every_view[rows], margin)
    top1 = served.argmax(axis=1)
    accuracy, agreement = float((top1 == labels).mean()), float((top1 == keras_top1).mean())
    keras_accuracy = float((keras_top1 == labels).mean())
    return {
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "test_accuracy": accuracy,
        "agreement": agreement,
        "every_view_share": float(unsure.mean()),
        "parity": every_view_parity
        and accuracy >= keras_accuracy - CASCADE_TOLERANCE
        and agreement >= PARITY_MIN_AGREEMENT,
        **check_features(classifier, path, features),
    }


def _said(record: dict) -> str:
    """What a log line adds about an export's features (`export_features`)."""
    features = record.get("features")
    if not features or "agreement" not in features:
        return ""
    served = "" if features["parity"] else f" (under {FEATURE_MIN_AGREEMENT:.1%}: served, it flags by texture alone)"
    return (
        f"; its own feature rule flags {features['flagged']:.1%} of the test images out of distribution (Keras "
        f"{features['keras_flagged']:.1%}), the same call on {features['agreement']:.1%}{served}"
    )


def _scored_layers(manifest: dict) -> list[str]:
    """The layers the version's feature rule scores (`model_lib.ood`), or none for a version without one."""
    return ((manifest.get("calibration") or {}).get("feature_rule") or {}).get("stages") or []


@dataclass(frozen=True)
class FeatureCheck:
    """What each export's own feature rule is fitted on, and measured against."""

    layers: list[str]  # the scored layers
    images: object  # the version's cached training images (a memory map)
    labels: np.ndarray  # their labels
    split: Split  # the version's split, made again from its config (`model_lib.split.run_split`)
    keras_outside: np.ndarray  # per test image, whether the version's own rule (on the Keras model) flags it


def _feature_check(
    version_dir: Path, manifest: dict, layers: list[str], network, arrays, x_test: np.ndarray
) -> FeatureCheck | None:
    """The version's `FeatureCheck` for the `layers` its rule scores, or None where it has none. Its rule file's
    checksum was verified with the version's other files by `load_verified_model`."""
    if not layers:
        return None
    rule = FeatureRule.load(version_dir / manifest["calibration"]["feature_rule"]["file"])
    labels = np.asarray(arrays.y_train)
    split = run_split(labels, manifest["config"]["validation_split"], manifest["config"]["seed"])
    keras_outside = rule.outside(classified(KerasClassifier(with_features(network, layers)), x_test)[1])
    return FeatureCheck(layers, arrays.x_train, labels, split, keras_outside)


def feature_rule_file(export: str) -> str:
    """The file of an export's own feature rule, beside it."""
    return f"{Path(export).stem}.{OOD_FILE}"


def export_features(classifier, path: Path, test_features: list | None, check: FeatureCheck | None) -> dict:
    """An export's `features` entry: its own rule, fitted on its features as calibration fitted the version's on the
    Keras model's (`model_lib.ood.fit_feature_rule`) and written beside it; the share of test images it flags against
    the Keras model's rule, the share on which the two agree, and parity (at least `FEATURE_MIN_AGREEMENT`). Empty for
    a version without a feature rule."""
    if check is None:
        return {}
    rule, _ = fit_feature_rule(classifier, check.layers, check.images, check.labels, check.split.train_index,
                               check.split.val_index)  # fmt: skip
    rule_path = path.with_name(feature_rule_file(path.name))
    with open(rule_path, "wb") as handle:
        rule.save(handle)
    outside = rule.outside(test_features)
    agreement = float((outside == check.keras_outside).mean())
    return {"features": {"file": rule_path.name, "flagged": float(outside.mean()),
                         "keras_flagged": float(check.keras_outside.mean()), "agreement": agreement,
                         "parity": agreement >= FEATURE_MIN_AGREEMENT}}  # fmt: skip


def _intact_exports(version_dir: Path, manifest: dict, formats: tuple[str, ...]) -> dict[str, dict]:
    """The manifest's export entries of `formats` whose files (and first view's) exist with the recorded checksum,
    by format."""
    entries = {entry["format"]: entry for entry in manifest.get("exports", []) if entry["format"] in formats}
    # verify_version also refuses a file the manifest does not list
    return {fmt: entry for fmt, entry in entries.items() if not verify_version(version_dir, export_files(entry))}
