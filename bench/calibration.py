"""Calibration and the unsure flags on a trained run: ECE/NLL before and after, accuracy, flag rates.

Runs the training flow's own calibration step (`model_lib.calibrate.calibrate`) on a run folder
(its `model.keras` before calibration and its `split.npz`) and the run's dataset cache, then
measures the flags on the test set and on the six kinds of synthetic non-photos (the texture rule alone:
bench/ood_flags.py measures it with the feature-space rule, through the prediction path).

    python bench/calibration.py RUN_DIR CACHE_DIR [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_lib.calibrate import calibrate  # noqa: E402
from model_lib.data import load_arrays  # noqa: E402
from model_lib.flags import flags  # noqa: E402
from model_lib.precision import machine_key  # noqa: E402
from model_lib.split import load_split  # noqa: E402
from tests.synthetic import unlike_images  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import keras

    arrays, split = load_arrays(args.cache_dir), load_split(args.run_dir / "split.npz")
    model = keras.saving.load_model(args.run_dir / "model.keras", safe_mode=True)
    x_val, y_val = np.asarray(arrays.x_train[split.val_index]), np.asarray(arrays.y_train[split.val_index])
    x_test, y_test = np.asarray(arrays.x_test), np.asarray(arrays.y_test)
    started = time.perf_counter()
    calibrated, record, _, _ = calibrate(model, x_val, y_val, x_test, y_test, arrays.x_train)
    seconds = time.perf_counter() - started

    def flag_rates(images: np.ndarray) -> dict[str, float]:
        probabilities = calibrated.predict(images, batch_size=500, verbose=0)
        marks = np.array(flags(probabilities, images, record["unsure_threshold"], record["texture_range"]))
        return {kind: round(float((marks == kind).mean()), 4) for kind in ("low_confidence", "out_of_distribution")}

    before = model.predict(x_test, batch_size=500, verbose=0).argmax(axis=1)
    after = calibrated.predict(x_test, batch_size=500, verbose=0).argmax(axis=1)
    result = {
        "run_dir": str(args.run_dir),
        "host": machine_key(),  # timings compare only on one host
        "calibration": record,
        "calibration_seconds": round(seconds, 1),
        "test_accuracy_before": round(float((before == y_test).mean()), 4),
        "test_accuracy_after": round(float((after == y_test).mean()), 4),
        "flags": {"cifar_test": flag_rates(x_test), **{k: flag_rates(v) for k, v in unlike_images(200).items()}},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
