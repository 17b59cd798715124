"""What exporting a version's three TFLite formats costs: a converter per format from the Keras model
(`TFLiteConverter.from_keras_model`, which traces the model and writes a SavedModel each time) against
one SavedModel written once (`model_lib.export.write_saved_model`) that every format converts from.

    python bench/export_speed.py
    python bench/export_speed.py --architectures transfer --rounds 1

Each architecture's serving model (flip TTA, as training registers it; random weights, seed 0) is
exported both ways in alternating rounds, after a warm-up conversion. Also reports, format by format,
the largest difference between the probabilities of the two ways' files on the calibration images
(the files' bytes differ in the converter's record of where the model came from).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def per_format(model, formats, calibration) -> tuple[dict, dict]:
    import tensorflow as tf

    from model_lib.export import run_converter

    seconds, files = {}, {}
    for export_format in formats:
        started = time.perf_counter()
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        files[export_format] = run_converter(converter, export_format, calibration)
        seconds[export_format] = time.perf_counter() - started
    return seconds, files


def one_saved_model(model, formats, calibration) -> tuple[dict, dict]:
    from model_lib.export import convert, write_saved_model

    seconds, files = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        saved_model = write_saved_model(model, Path(scratch) / "saved_model")
        seconds["saved model"] = time.perf_counter() - started
        for export_format in formats:
            started = time.perf_counter()
            files[export_format] = convert(saved_model, export_format, calibration)
            seconds[export_format] = time.perf_counter() - started
    return seconds, files


def output_difference(tflite: bytes, reference: bytes, images: np.ndarray) -> float:
    """The largest difference between two TFLite files' probabilities on `images` (0.0: the same outputs)."""
    from model_lib.inference import TFLiteClassifier

    with tempfile.TemporaryDirectory() as scratch:
        outputs = []
        for name, data in (("a.tflite", tflite), ("b.tflite", reference)):
            (Path(scratch) / name).write_bytes(data)
            outputs.append(TFLiteClassifier(Path(scratch) / name).predict(images))
    return float(np.abs(outputs[0] - outputs[1]).max())


def main() -> None:
    from model_lib.export import CALIBRATION_IMAGES
    from model_lib.models import ARCHITECTURES
    from model_lib.serving import TFLITE_FORMATS  # this compares TFLite converters

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architectures", default="airbench,transfer", help="comma-separated, from model_lib.models")
    parser.add_argument("--formats", default=",".join(TFLITE_FORMATS), help="comma-separated export formats")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of both ways (at least 1)")
    args = parser.parse_args()
    architectures, formats = args.architectures.split(","), tuple(args.formats.split(","))
    if unknown := [a for a in architectures if a not in ARCHITECTURES]:
        parser.error(f"--architectures: unknown {', '.join(unknown)}; choose from {', '.join(ARCHITECTURES)}")
    if unknown := [f for f in formats if f not in TFLITE_FORMATS]:
        parser.error(f"--formats: unknown {', '.join(unknown)}; choose from {', '.join(TFLITE_FORMATS)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")

    import keras

    from model_lib.models import build_model, with_tta

    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 256, (CALIBRATION_IMAGES, 32, 32, 3)).astype(np.uint8)
    print(json.dumps({"host": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "tensorflow": __import__("tensorflow").__version__, "keras": keras.__version__}))  # fmt: skip
    one_saved_model(build_model("seed_cnn", 10), ("float32",), calibration)  # imports and first-use costs
    for architecture in architectures:
        keras.utils.set_random_seed(0)
        model = with_tta(build_model(architecture, 10, calibration_images=calibration))
        for round_number in range(args.rounds):
            for way, export in (("per format", per_format), ("one saved model", one_saved_model)):
                seconds, files = export(model, formats, calibration)
                if way == "per format":
                    reference = files
                difference = {fmt: output_difference(files[fmt], reference[fmt], calibration) for fmt in formats}
                print(json.dumps({"architecture": architecture, "round": round_number, "way": way,
                                  "seconds": {k: round(v, 2) for k, v in seconds.items()},
                                  "total_s": round(sum(seconds.values()), 2),
                                  "bytes": {fmt: len(files[fmt]) for fmt in formats},
                                  "max_output_difference_from_per_format": difference}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
