"""What scoring a trained model's test images in every TTA view costs: Keras' `predict` against one traced function.

    python bench/inference_paths.py MODEL_DIR CACHE_DIR --images 3000 --rounds 3

MODEL_DIR is a registered version (its `model.keras`), CACHE_DIR an ingested dataset whose test
images are scored. Calibration's per-view logits (every distinct view the model's TTA averages,
batches of 500), as calibration and evaluation computed them before (Keras' `predict`) and now
(`KerasClassifier` on the model as saved), each in turn in every round after one warm-up pass.
Each line gives milliseconds per image and view and the largest difference from the first
variant's outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def view_logits_by_predict(model, images: np.ndarray, batch_size: int = 500) -> list[np.ndarray]:
    """Calibration's view logits as they were computed before: Keras' `predict` on each view."""
    import keras

    from model_lib.calibrate import _logits_and_temperature
    from model_lib.models import unwrap_tta, view_pixels

    network, views = unwrap_tta(model)
    logit_model = keras.Model(network.inputs, _logits_and_temperature(network)[0])
    scored = {
        view: np.asarray(logit_model.predict(view_pixels(images, *view), batch_size=batch_size, verbose=0), np.float64)
        for view in dict.fromkeys(views)
    }
    return [scored[view] for view in views]


def main() -> None:
    import keras

    from model_lib.calibrate import view_logits
    from model_lib.data import load_arrays
    from model_lib.models import unwrap_tta
    from model_lib.precision import machine_key

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument("--images", type=int, default=10000, help="test images scored")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model = keras.saving.load_model(args.model_dir / "model.keras", safe_mode=True)
    images = np.asarray(load_arrays(args.cache_dir).x_test[: args.images])
    views = len(set(unwrap_tta(model)[1])) or 1  # distinct views: a view weighted twice is scored once
    variants = {
        "keras predict (before)": lambda: np.stack(view_logits_by_predict(model, images)),
        "traced classifier (now)": lambda: np.stack(view_logits(model, images)),
    }
    print(json.dumps({"host": machine_key(), "backend": keras.backend.backend(), "model": str(args.model_dir),
                      "images": len(images), "views": views}), flush=True)  # fmt: skip
    reference = None
    for run in variants.values():  # warm-up: traces and first-touch allocations
        outputs = run()
        reference = outputs if reference is None else reference
    for round_ in range(args.rounds):
        for variant, run in variants.items():
            started = time.perf_counter()
            outputs = run()
            seconds = time.perf_counter() - started
            print(json.dumps({"round": round_, "variant": variant,
                              "ms_per_image_and_view": round(1000 * seconds / (len(images) * views), 3),
                              "max_difference": float(np.abs(outputs - reference).max())}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
