"""One TTA view first, all views only for unsure images: accuracy, calibration and speed, side by side.

    python bench/tta_cascade.py --model artifacts/models/cifar10/v1 [--data ../shared/datasets/cifar10]

On the CIFAR-10 test JPEGs with a version that serves with TTA: the saved model (every view) and its
network alone (the first view), each timed through the same traced classifier on decoded pixels;
then, for first-view margins (top-1 minus top-2 probability) below each threshold, the share of images
that would need every view, the cascade's accuracy and its expected calibration error.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a version folder")
    parser.add_argument("--data", default=os.environ.get("CIFAR10_DIR") or str(REPO.parent / "shared/datasets/cifar10"))
    args = parser.parse_args()

    from model_lib.calibrate import expected_calibration_error
    from model_lib.images import decode_files
    from model_lib.inference import KerasClassifier
    from model_lib.models import unwrap_tta
    from model_lib.versions import load_verified_model

    folders = sorted((Path(args.data) / "test").iterdir())
    paths = [path for folder in folders for path in sorted(folder.iterdir())]
    labels = np.array([index for index, folder in enumerate(folders) for _ in sorted(folder.iterdir())])
    pixels = decode_files(paths, 32).pixels
    model = load_verified_model(Path(args.model))
    network, views = unwrap_tta(model)
    print(f"{len(paths)} images; the saved model averages {len(views)} views {views}")
    outputs = {}
    for name, classifier in (("every view", KerasClassifier(model)), ("first view", KerasClassifier(network))):
        classifier.predict(pixels[:256])  # traced before the clock starts
        started = time.perf_counter()
        outputs[name] = classifier.predict(pixels)
        speed = len(pixels) / (time.perf_counter() - started)
        accuracy = (outputs[name].argmax(axis=1) == labels).mean()
        ece = expected_calibration_error(outputs[name], labels)
        print(f"{name:>10}: {speed:6.0f} images/s, accuracy {accuracy:.4f}, ECE {ece:.4f}")
    every, first = outputs["every view"], outputs["first view"]
    ranked = np.sort(first, axis=1)
    margin = ranked[:, -1] - ranked[:, -2]
    for threshold in (0.1, 0.2, 0.3, 0.4, 0.5):
        again = margin < threshold
        cascade = np.where(again[:, None], every, first)
        accuracy = (cascade.argmax(axis=1) == labels).mean()
        ece = expected_calibration_error(cascade, labels)
        print(f"margin < {threshold}: every view for {again.mean():.3f} of the images, accuracy {accuracy:.4f}, "
              f"ECE {ece:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
